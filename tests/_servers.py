"""Real servers in a subprocess, for the shutdown tests (`test_server.py`,
`test_hypercorn.py`).

Each serves `tests.apps.shutdown:app` on a free 127.0.0.1 port, answers once
its context is entered (or fails with the server's own output), and is killed
on the way out if still running. The process runs in a session of its own, so
that a server with worker processes (hypercorn) is killed whole.

Underneath, `spawn` starts any such process and waits for a readiness check of
the caller's: an HTTP answer for the servers, a marker file for the taskiq
worker of `test_taskiq_redis.py`.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import httpx2
import pytest

REPO = Path(__file__).parent.parent
STARTUP_DEADLINE_S = 20.0
EXIT_DEADLINE_S = 20.0
POLL_S = 0.05
APP = "tests.apps.shutdown:app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def terminate(self) -> str:
        """Send SIGTERM, wait (bounded) for the process to end, return its output."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=EXIT_DEADLINE_S)
        return self.log.read_text()


@contextmanager
def spawn(
    command: list[str],
    log: Path,
    ready: Callable[[], bool],
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` from the repository, with `env` added to its environment
    and its output in `log`, until `ready()` (polled for at most
    STARTUP_DEADLINE_S); fail with its output if it exits or the deadline
    passes first. The process runs in a session of its own, killed whole on
    the way out if still running."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        what = f"{shlex.join(command)} (output in {log})"
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not ready():  # poll, for a bounded time
            if process.poll() is not None:
                pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not ready in {STARTUP_DEADLINE_S} s:\n{log.read_text()}")
            time.sleep(POLL_S)
        yield process
    finally:
        if process.poll() is None:
            # Its own session: the group is this process and its children only.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def serve(
    tmp_path: Path,
    command: list[str],
    url: str,
    ready_path: str = "/health",
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Run `command` (a server listening at `url`) with the markers directory
    of `tmp_path` and `env` in its environment, until it answers ``GET {ready_path}``."""
    log = tmp_path / "server.log"
    (tmp_path / "markers").mkdir()
    env = {"BGPLUS_MARKERS": str(tmp_path / "markers"), **(env or {})}

    def answers() -> bool:
        try:
            httpx2.get(f"{url}{ready_path}", timeout=1.0).raise_for_status()
        except httpx2.TransportError:
            return False
        return True

    with spawn(command, log, answers, env) as process:
        yield Server(process, url, log)


@contextmanager
def uvicorn(
    tmp_path: Path, *args: str, app: str = APP, env: Mapping[str, str] | None = None
) -> Iterator[Server]:
    """uvicorn serving `app` (the shutdown app by default), with `args` added
    to its command line and `env` to its environment."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", *args]
    with serve(tmp_path, command, f"http://127.0.0.1:{port}", env=env) as server:
        yield server


@contextmanager
def hypercorn(tmp_path: Path, *args: str) -> Iterator[Server]:
    """hypercorn serving the shutdown app, with `args` added to its command line.

    With its default of one worker, hypercorn serves from a child process; the
    SIGTERM sent to the parent reaches the worker as a shutdown event."""
    port = free_port()
    command = [sys.executable, "-m", "hypercorn", APP, "--bind", f"127.0.0.1:{port}", *args]
    with serve(tmp_path, command, f"http://127.0.0.1:{port}") as server:
        yield server


def queue(server: Server, names: list[str], seconds: float) -> dict[str, dict[str, str]]:
    """Queue an async and a sync task per name (the sync one first for the
    second name); return their ids by name, then by function."""
    ids = {}
    with httpx2.Client(base_url=server.url) as client:
        for index, name in enumerate(names):
            params: dict[str, str | float | bool] = {
                "name": name,
                "seconds": seconds,
                "sync_first": index == 1,
            }
            response = client.post("/queue", params=params)
            response.raise_for_status()
            ids[name] = response.json()
    return ids


def markers(tmp_path: Path) -> set[str]:
    return {path.name for path in (tmp_path / "markers").iterdir()}


@contextmanager
def gunicorn(tmp_path: Path, *args: str) -> Iterator[Server]:
    """gunicorn with one uvicorn worker (``uvicorn_worker.UvicornWorker``, from
    the uvicorn-worker package; uvicorn's own ``uvicorn.workers`` is deprecated)
    serving the shutdown app, with `args` added to its command line."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", APP, "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", "1", "--worker-class", "uvicorn_worker.UvicornWorker", *args]
    if int(version("gunicorn").split(".")[0]) >= 27:
        # Its control socket has one path per user: tests run side by side.
        command.append("--no-control-socket")
    with serve(tmp_path, command, f"http://127.0.0.1:{port}") as server:
        yield server
