"""A real hypercorn server in a subprocess, shut down with SIGTERM (issue 8).

The app is `tests/apps/shutdown.py`, served on hypercorn's asyncio and trio
workers. On SIGTERM hypercorn stops accepting connections and waits up to
``--graceful-timeout`` seconds (3 by default) for the connections in flight,
background work included, then cancels them; the lifespan shutdown runs after
that. The parent process exits with 0 once its worker has.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from ._servers import hypercorn, markers, queue

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("worker_class", ["asyncio", "trio"]),
]


def test_sigterm_lets_short_tasks_finish_and_names_those_cut_off(
    tmp_path: Path, worker_class: str
) -> None:
    """Short tasks in flight at SIGTERM finish within the graceful timeout;
    past it, the task still running and the one queued behind it are each
    named by id and function (never by argument) as cancelled."""
    with hypercorn(tmp_path, "--worker-class", worker_class, "--graceful-timeout", "3") as server:
        # 0.5 s each, one after the other: in flight when SIGTERM is sent.
        queue(server, ["short@example.com"], seconds=0.5)
        # The async task first: cut off while running; the sync one never starts.
        (slow,) = queue(server, ["slow@example.com"], seconds=60.0).values()
        output = server.terminate()
    assert server.process.returncode == 0, output
    assert markers(tmp_path) == {"short@example.com-async", "short@example.com-sync"}
    lines = output.splitlines()
    for function, task_id in slow.items():
        (line,) = [line for line in lines if task_id in line]
        assert line.startswith("WARNING fastapi_bgplus: Background task"), line
        assert f"(tests.apps.shutdown.{function}) abandoned:" in line
        assert "cancelled" in line
        state = "cut off while running" if function == "write_marker_async" else "never started"
        assert state in line
    assert "slow@example.com" not in output  # arguments are never logged
    assert "since startup: 2 done, 0 failed, 2 abandoned" in output


def test_a_sync_task_cut_off_runs_on_in_its_thread(tmp_path: Path, worker_class: str) -> None:
    """Python cannot interrupt a thread: the task is reported cancelled at the
    graceful timeout, yet its thread runs on. On the asyncio worker (anyio's
    threads are not daemons) the worker process waits for it, so its work is
    done after all; on the trio worker the process exits and the thread dies."""
    with hypercorn(tmp_path, "--worker-class", worker_class, "--graceful-timeout", "1") as server:
        params: dict[str, str | float | bool] = {
            "name": "slow@example.com",
            "seconds": 4.0,
            "sync_first": True,
        }
        response = httpx2.post(f"{server.url}/queue", params=params)
        task_id = response.raise_for_status().json()["write_marker_sync"]
        output = server.terminate()
    assert server.process.returncode == 0, output
    (line,) = [line for line in output.splitlines() if task_id in line]
    assert "cut off while running" in line
    expected = {"slow@example.com-sync"} if worker_class == "asyncio" else set()
    assert markers(tmp_path) == expected
