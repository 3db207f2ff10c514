"""A real uvicorn server in a subprocess, shut down with SIGTERM (issue 3).

The app is `tests/apps/shutdown.py`. uvicorn runs on asyncio only, so these
tests do too. uvicorn >= 0.29 re-raises the signal once its shutdown is
complete, so a clean exit on SIGTERM is a return code of ``-SIGTERM``; the
log lines tell a clean shutdown from a killed one.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ._servers import markers, queue, uvicorn

pytestmark = pytest.mark.slow

NAMES = ["ada@example.com", "grace@example.com", "alan@example.com"]


def test_sigterm_lets_every_queued_task_finish(tmp_path: Path) -> None:
    with uvicorn(tmp_path) as server:
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
    with uvicorn(tmp_path, "--timeout-graceful-shutdown", "1") as server:
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
