"""Detached mode under real servers, shut down with SIGTERM (issue 13).

The app is `tests/apps/shutdown.py` with ``BGPLUS_DETACH=1``. Requests end as
soon as their response is sent, so the server has nothing in flight at
SIGTERM; the lifespan shutdown runs at once and the tracker's drain, bounded
by ``drain_timeout``, is what waits for the tasks and names those it cuts off.

Under gunicorn (one `uvicorn_worker.UvicornWorker`), this is the difference
between a named loss and a silent one: the worker does not pass gunicorn's
``--graceful-timeout`` to uvicorn, so without detach uvicorn waits for the
in-request tasks until gunicorn SIGKILLs the worker, and the lifespan shutdown
never runs.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx2
import pytest

from ._servers import Server, gunicorn, markers, queue, uvicorn
from .conftest import FASTAPI

pytestmark = pytest.mark.slow

NAMES = ["ada@example.com", "grace@example.com"]


@pytest.fixture
def detach(monkeypatch: pytest.MonkeyPatch) -> None:
    if FASTAPI < (0, 121):
        pytest.skip("FastAPI < 0.121 has no request exit stacks: the tasks run in the request")
    monkeypatch.setenv("BGPLUS_DETACH", "1")


def assert_each_cut_off_task_is_named(
    output: str, ids: dict[str, dict[str, str]], drain_timeout: str
) -> None:
    lines = output.splitlines()
    for name, by_function in ids.items():
        first = next(iter(by_function))
        for function, task_id in by_function.items():
            (line,) = [line for line in lines if task_id in line]
            assert line.startswith("WARNING fastapi_bgplus: Background task"), line
            assert f"(tests.apps.shutdown.{function}) abandoned: the application shut down" in line
            assert f"drain_timeout ({drain_timeout} s) ran out" in line
            state = "it was cut off while running" if function == first else "it never started"
            assert line.endswith(state), line
        assert name not in output  # arguments are never logged
    count = sum(len(by_function) for by_function in ids.values())
    assert f"since startup: 0 done, 0 failed, {count} abandoned" in output


@pytest.mark.usefixtures("detach")
def test_uvicorn_the_drain_waits_for_detached_tasks(tmp_path: Path) -> None:
    """uvicorn has no request in flight at SIGTERM; the drain waits for the
    tasks (without detach, uvicorn would, and the drain would find none)."""
    with uvicorn(tmp_path) as server:
        queue(server, NAMES, seconds=0.5)
        output = server.terminate()
    assert server.process.returncode == -signal.SIGTERM, output
    assert markers(tmp_path) == {f"{name}-{kind}" for name in NAMES for kind in ("async", "sync")}
    assert "Shutting down: waiting up to 30.0 s for 4 background task(s)" in output
    assert "since startup: 4 done, 0 failed, 0 abandoned" in output


@pytest.mark.usefixtures("detach")
def test_uvicorn_past_drain_timeout_each_detached_task_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --timeout-graceful-shutdown: without detach uvicorn would wait the
    full 60 s; detached, the drain cuts the tasks off after 1 s."""
    monkeypatch.setenv("BGPLUS_DRAIN_TIMEOUT", "1")
    with uvicorn(tmp_path) as server:
        ids = queue(server, NAMES, seconds=60.0)
        output = server.terminate()
    assert server.process.returncode == -signal.SIGTERM, output
    assert markers(tmp_path) == set()
    assert_each_cut_off_task_is_named(output, ids, "1.0")
    assert "Application shutdown complete." in output


def terminate_gunicorn(server: Server) -> str:
    output = server.terminate()
    assert server.process.returncode == 0, output
    assert "Shutting down: Master" in output
    return output


def test_gunicorn_without_detach_tasks_past_the_graceful_timeout_vanish(tmp_path: Path) -> None:
    """What detach fixes: the worker is killed at --graceful-timeout while
    uvicorn still waits for the requests' tasks; no line names them."""
    with gunicorn(tmp_path, "--graceful-timeout", "2") as server:
        ids = queue(server, NAMES, seconds=60.0)
        output = terminate_gunicorn(server)
    assert markers(tmp_path) == set()
    assert "Waiting for background tasks to complete." in output  # uvicorn, in the worker
    assert "Waiting for application shutdown." not in output  # the lifespan never shut down
    assert "since startup" not in output
    for by_function in ids.values():
        for task_id in by_function.values():
            assert task_id not in output


@pytest.mark.usefixtures("detach")
def test_gunicorn_with_detach_the_drain_names_each_cut_off_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe: detach=True and drain_timeout below --graceful-timeout."""
    monkeypatch.setenv("BGPLUS_DRAIN_TIMEOUT", "1")
    with gunicorn(tmp_path, "--graceful-timeout", "5") as server:
        ids = queue(server, NAMES, seconds=60.0)
        output = terminate_gunicorn(server)
    assert markers(tmp_path) == set()
    assert_each_cut_off_task_is_named(output, ids, "1.0")
    assert "Application shutdown complete." in output


@pytest.mark.usefixtures("detach")
def test_gunicorn_with_detach_short_tasks_finish(tmp_path: Path) -> None:
    with gunicorn(tmp_path, "--graceful-timeout", "5") as server:
        queue(server, NAMES, seconds=0.5)
        output = terminate_gunicorn(server)
    assert markers(tmp_path) == {f"{name}-{kind}" for name in NAMES for kind in ("async", "sync")}
    assert "since startup: 4 done, 0 failed, 0 abandoned" in output


@pytest.mark.usefixtures("detach")
@pytest.mark.parametrize("stubborn", [True, False])
def test_a_hanging_receiver_and_a_task_that_swallows_cancellation_bound_the_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stubborn: bool
) -> None:
    """drain_timeout plus shutdown_grace, plus a few seconds for the server
    itself: the summary is logged, the tasks are named, the process ends."""
    monkeypatch.setenv("BGPLUS_DRAIN_TIMEOUT", "1")
    monkeypatch.setenv("BGPLUS_GRACE", "1")
    monkeypatch.setenv("BGPLUS_HANGING_RECEIVER", "1")
    with uvicorn(tmp_path) as server:
        ids = queue(server, NAMES, seconds=60.0)
        stubborn_id = ""
        if stubborn:
            stubborn_id = httpx2.post(f"{server.url}/stubborn", timeout=5.0).json()["id"]
        started = time.monotonic()
        output = server.terminate()
        took = time.monotonic() - started
    assert took < 1 + 1 + 4, output
    count = 5 if stubborn else 4
    assert f"since startup: 0 done, 0 failed, {count} abandoned" in output
    if stubborn:
        (line,) = [line for line in output.splitlines() if stubborn_id in line]
        assert "did not stop within shutdown_grace" in line
    for by_function in ids.values():
        for task_id in by_function.values():
            assert task_id in output
