"""A real Redis server for the tests: Debian's `redis-server`, one per session.

It listens on a free port on 127.0.0.1 and on a unix socket, in a temporary
directory, with persistence off (``--save "" --appendonly no``), and is stopped
by its pid at the end. `RedisServer.stop()` and `start()` take it down and
bring it back on the same port mid-test, for the store fault tests.

Without the binary the Redis tests skip, saying how to install it; under
``CI=true`` they fail instead, so that a green CI run always means they ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._servers import free_port

STARTUP_DEADLINE_S = 10.0
EXIT_DEADLINE_S = 10.0
INSTALL = "apt-get install redis-server"


class RedisServer:
    """One `redis-server` process, restartable on the same port."""

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self.unix_socket = directory / "redis.sock"
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server, wait (bounded) until it answers PING; fail with its output if not."""
        assert self.process is None, "redis-server is already running"
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start:\n{self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server by its pid and wait (bounded) for it to exit."""
        process, self.process = self.process, None
        assert process is not None, "redis-server is not running"
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=EXIT_DEADLINE_S)
            except subprocess.TimeoutExpired:  # pragma: no cover  (a hung server)
                process.kill()
                process.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGCONT)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running `redis-server`; tests share it and keep apart by key prefix."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = f"redis-server is not installed; the Redis tests need it: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    yield server
    if server.process is not None:
        server.stop()
