"""A real uvicorn server in a subprocess, shut down with SIGTERM (issue 3).

The app is `tests/apps/shutdown.py`. uvicorn runs on asyncio only, so these
tests do too. uvicorn >= 0.29 re-raises the signal once its shutdown is
complete, so a clean exit on SIGTERM is a return code of ``-SIGTERM``; the
log lines tell a clean shutdown from a killed one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).parent.parent
STARTUP_DEADLINE_S = 20.0
EXIT_DEADLINE_S = 20.0


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
def serve(tmp_path: Path, *uvicorn_args: str) -> Iterator[Server]:
    """uvicorn serving `tests.apps.shutdown:app` on a free loopback port,
    answering once this enters; killed on the way out if still running."""
    port = free_port()
    log = tmp_path / "server.log"
    (tmp_path / "markers").mkdir()
    env = {**os.environ, "BGPLUS_MARKERS": str(tmp_path / "markers")}
    command = [sys.executable, "-m", "uvicorn", "tests.apps.shutdown:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", *uvicorn_args]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:  # poll until it answers, for a bounded time
            try:
                httpx2.get(f"{url}/health", timeout=1.0).raise_for_status()
                break
            except httpx2.TransportError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield Server(process, url, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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


NAMES = ["ada@example.com", "grace@example.com", "alan@example.com"]


def test_sigterm_lets_every_queued_task_finish(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        queue(server, NAMES, seconds=0.3)
        output = server.terminate()
    assert server.process.returncode == -signal.SIGTERM, output
    assert markers(tmp_path) == {f"{name}-{kind}" for name in NAMES for kind in ("async", "sync")}
    assert "Application shutdown complete." in output
    assert "since startup: 6 done, 0 failed, 0 abandoned" in output
    assert "abandoned:" not in output


def test_past_the_graceful_timeout_every_lost_task_is_named(tmp_path: Path) -> None:
    """uvicorn cancels the requests still running after its graceful timeout;
    the process exits at once (a sync task's thread does not hold it up), and
    the log names each task lost, by id and function, never by argument."""
    with serve(tmp_path, "--timeout-graceful-shutdown", "1") as server:
        ids = queue(server, NAMES, seconds=60.0)
        output = server.terminate()
    assert server.process.returncode == -signal.SIGTERM, output
    assert markers(tmp_path) == set()
    lines = output.splitlines()
    for name, by_function in ids.items():
        for function, task_id in by_function.items():
            (line,) = [line for line in lines if task_id in line]
            assert line.startswith("WARNING fastapi_bgplus: Background task"), line
            assert f"(tests.apps.shutdown.{function}) abandoned:" in line
            first = next(iter(by_function))
            state = "was cut off while running" if function == first else "never started"
            assert line.endswith(state), line
        assert name not in output  # arguments are never logged
    assert "since startup: 0 done, 0 failed, 6 abandoned" in output
    assert "Application shutdown complete." in output
