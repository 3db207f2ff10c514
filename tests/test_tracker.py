"""The `TaskTracker` lifespan hook: tracking, lookup, bounded history, the
status route and the drain at shutdown (issue 3, shutdown edges of issue 5).

Lifespans are driven directly (``async with tracker.lifespan(app)``) or by
Starlette's `TestClient`, on asyncio and on trio. Requests through FastAPI
show that its provider binds each request's collection to the tracker; the
drain tests bind collections the same way by hand (`request_tasks()`, in
tests/apps/memory.py) to control exactly when each one runs.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.from_thread
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastapi_bgplus import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_HISTORY_TTL,
    BackgroundTasks,
    TaskHandle,
    TaskTracker,
    TrackedBackgroundTasks,
    current_thread_limiter,
)

from .apps.memory import Stubborn, noop, request_tasks, run_tasks
from .conftest import Sent

REPO = Path(__file__).parent.parent

Backend = Literal["asyncio", "trio"]


def drain_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fastapi_bgplus"]


def summary(caplog: pytest.LogCaptureFixture) -> str:
    (line,) = [r.getMessage() for r in drain_records(caplog) if "drained" in r.getMessage()]
    return line


@pytest.fixture(autouse=True)
def _log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")


# The hook in an application


@pytest.mark.parametrize("hook", ["lifespan", "wrap"])
def test_a_fastapi_app_tracks_the_tasks_of_its_requests(hook: str, anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    events: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("startup")
        yield {"greeting": "hello"}
        events.append("shutdown")

    app = FastAPI(lifespan=tracker.lifespan if hook == "lifespan" else tracker.wrap(own))

    @app.post("/")
    async def endpoint(request: Request, tasks: BackgroundTasks) -> dict[str, Any]:
        handle = tasks.add_task(noop)
        assert tracker.get(handle.task_id) is handle
        assert tracker.in_flight == [handle]
        return {"task_id": handle.task_id, "greeting": getattr(request.state, "greeting", None)}

    with TestClient(app, backend=anyio_backend) as client:
        body = client.post("/").json()
        handle = tracker.get(body["task_id"])
        assert handle is not None
        assert handle.status == "done"
        assert tracker.in_flight == []
    if hook == "wrap":
        assert body["greeting"] == "hello"
        assert events == ["startup", "shutdown"]


def test_a_mounted_app_s_tasks_are_tracked_and_sent_as_its_own(
    anyio_backend: Backend, sent: list[Sent]
) -> None:
    """A FastAPI app mounted in the one whose lifespan runs the tracker: its
    requests' tasks are tracked too, and their signals name the app each
    request belongs to, whatever the order the requests come in."""
    tracker = TaskTracker()
    outer = FastAPI(lifespan=tracker.lifespan)
    inner = FastAPI()
    handles: list[TaskHandle] = []

    @outer.get("/")
    async def home(tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(noop))

    @inner.get("/")
    async def sub(tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(noop))

    outer.mount("/sub", inner)
    paths = ["/", "/sub/", "/sub/", "/", "/sub/"]
    with TestClient(outer, backend=anyio_backend) as client:
        for path in paths:
            assert client.get(path).status_code == 200
        assert [tracker.get(handle.task_id) for handle in handles] == handles
    assert [handle.status for handle in handles] == ["done"] * len(paths)
    completed = [e for e in sent if e.signal == "task_completed"]
    assert [e.kwargs["handle"] for e in completed] == handles
    assert [e.sender for e in completed] == [inner if path == "/sub/" else outer for path in paths]


def test_a_wrapped_lifespan_may_yield_no_state(anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    events: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=tracker.wrap(own))

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> str:
        return tasks.add_task(noop).task_id

    with TestClient(app, backend=anyio_backend) as client:
        task_id = client.post("/").json()
        assert tracker.get(task_id) is not None
    assert events == ["startup", "shutdown"]


def test_a_starlette_app_keeps_its_lifespan_and_runs_hand_built_collections(
    anyio_backend: Backend,
) -> None:
    """Plain Starlette: the hook runs the app's own startup, state and shutdown.
    A collection built by hand knows no request, so it runs untracked (and the
    drain has nothing of it to wait for)."""
    tracker = TaskTracker()
    events: list[str] = []
    handles: list[TaskHandle] = []

    @asynccontextmanager
    async def own(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append("startup")
        yield {"db": "the db"}
        events.append("shutdown")

    async def endpoint(request: Request) -> JSONResponse:
        tasks = TrackedBackgroundTasks()
        handles.append(tasks.add_task(events.append, f"task saw {request.state.db}"))
        return JSONResponse({"db": request.state.db}, background=tasks)

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])], lifespan=tracker.wrap(own))
    with TestClient(app, backend=anyio_backend) as client:
        assert client.post("/").json() == {"db": "the db"}
    assert events == ["startup", "task saw the db", "shutdown"]
    assert handles[0].status == "done"
    assert tracker.get(handles[0].task_id) is None


@pytest.mark.anyio
async def test_the_drain_runs_before_the_wrapped_shutdown() -> None:
    """Tasks still running at shutdown can use what the app's lifespan set up:
    its shutdown code runs only once they have finished."""
    tracker = TaskTracker(drain_timeout=math.inf)
    db = {"open": False}
    events: list[str] = []
    running, release = anyio.Event(), anyio.Event()

    @asynccontextmanager
    async def own(app: object) -> AsyncIterator[dict[str, Any]]:
        db["open"] = True
        yield {"db": db}
        events.append("shutdown")
        db["open"] = False

    async def task(db: dict[str, bool]) -> None:
        running.set()
        await release.wait()
        events.append(f"task ran with the db open: {db['open']}")

    async def request(state: Mapping[str, Any]) -> None:
        async with request_tasks(state) as tasks:
            tasks.add_task(task, state["db"])

    async def release_once_draining() -> None:
        await anyio.wait_all_tasks_blocked()
        events.append("draining")
        release.set()

    async with anyio.create_task_group() as tg, tracker.wrap(own)(None) as state:
        tg.start_soon(request, state)
        await running.wait()
        tg.start_soon(release_once_draining)
    assert events == ["draining", "task ran with the db open: True", "shutdown"]


@pytest.mark.anyio
@pytest.mark.parametrize("hook", ["lifespan", "wrap"])
async def test_a_tracker_serves_one_application_at_a_time(hook: str) -> None:
    tracker = TaskTracker()
    startups: list[object] = []

    @asynccontextmanager
    async def own(app: object) -> AsyncIterator[None]:
        startups.append(app)
        yield

    enter = tracker.lifespan if hook == "lifespan" else tracker.wrap(own)
    async with enter("first app"):
        with pytest.raises(RuntimeError, match="already serving an application; create one"):
            async with enter("second app"):
                pass  # pragma: no cover
        # Refused before the second app's own startup ran.
        assert startups == ([] if hook == "lifespan" else ["first app"])


@pytest.mark.anyio
async def test_a_tracker_starts_again_after_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    tracker = TaskTracker()
    for run in range(2):
        async with tracker.lifespan(None) as state, request_tasks(state) as tasks:
            handle = tasks.add_task(noop)
        assert tracker.get(handle.task_id) is handle
        # Counts are per run of the application.
        assert summary(caplog).endswith("since startup: 1 done, 0 failed, 0 abandoned"), run
        caplog.clear()


@pytest.mark.anyio
async def test_a_failed_startup_leaves_the_tracker_free() -> None:
    tracker = TaskTracker()

    @asynccontextmanager
    async def broken(app: object) -> AsyncIterator[None]:
        raise OSError("database unreachable")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="database unreachable"):
        async with tracker.wrap(broken)(None):
            pass  # pragma: no cover
    async with tracker.lifespan(None) as state:
        assert state["fastapi_bgplus.tracker"] is tracker


@pytest.mark.anyio
async def test_thread_limit_resizes_the_limiter_at_startup() -> None:
    tracker = TaskTracker(thread_limit=3)
    async with tracker.lifespan(None):
        assert current_thread_limiter().total_tokens == 3


# Lookup


@pytest.mark.anyio
async def test_get_finds_a_task_pending_running_and_finished() -> None:
    tracker = TaskTracker()
    running, release = anyio.Event(), anyio.Event()
    handles: list[TaskHandle] = []

    async def slow() -> None:
        running.set()
        await release.wait()

    async def request(state: Mapping[str, Any]) -> None:
        async with request_tasks(state) as tasks:
            handles.extend([tasks.add_task(slow), tasks.add_task(noop)])
            assert tracker.in_flight == handles
            assert [tracker.get(h.task_id) for h in handles] == handles
            assert [h.status for h in handles] == ["pending", "pending"]

    async with tracker.lifespan(None) as state, anyio.create_task_group() as tg:
        tg.start_soon(request, state)
        await running.wait()
        first, second = handles
        assert tracker.get(first.task_id) is first
        assert first.status == "running"
        assert tracker.get(second.task_id) is second
        assert second.status == "pending"
        assert tracker.in_flight == [first, second]
        release.set()
    assert tracker.in_flight == []
    assert [tracker.get(h.task_id) for h in handles] == handles
    assert [h.status for h in handles] == ["done", "done"]
    assert tracker.get("0" * 32) is None


@pytest.mark.anyio
async def test_two_apps_never_see_each_others_tasks() -> None:
    one, two = TaskTracker(), TaskTracker()
    async with one.lifespan("app one") as state_one, two.lifespan("app two") as state_two:
        async with request_tasks(state_one) as tasks:
            of_one = tasks.add_task(noop)
            assert one.in_flight == [of_one]
            assert two.in_flight == []
        async with request_tasks(state_two) as tasks:
            of_two = tasks.add_task(noop)
            assert two.in_flight == [of_two]
            assert one.in_flight == []
        assert one.get(of_one.task_id) is of_one
        assert one.get(of_two.task_id) is None
        assert two.get(of_two.task_id) is of_two
        assert two.get(of_one.task_id) is None


@pytest.mark.anyio
async def test_an_app_with_state_but_no_tracker_is_not_tracked_by_another_apps() -> None:
    # Its own lifespan state, without the tracker in it: the app's tasks are
    # sent as the app's, and the tracker serving another app never sees them.
    tracker = TaskTracker()
    app = Starlette()
    async with tracker.lifespan("another app"):
        tasks = TrackedBackgroundTasks.for_request({"type": "http", "state": {"db": 1}, "app": app})
        handle = tasks.add_task(noop)
        assert tasks.app is app
        assert tracker.in_flight == []
        await tasks.run()
        assert handle.status == "done"
        assert tracker.get(handle.task_id) is None


def test_repr_counts_tasks() -> None:
    assert repr(TaskTracker()) == "<TaskTracker in_flight=0 history=0>"


# Bounded history


def test_history_defaults_are_documented_constants() -> None:
    tracker = TaskTracker()
    assert tracker.history_size == DEFAULT_HISTORY_SIZE == 10_000
    assert tracker.history_ttl == DEFAULT_HISTORY_TTL == 3600.0


@pytest.mark.anyio
async def test_the_oldest_finished_handles_go_first() -> None:
    tracker = TaskTracker(history_size=3)
    async with tracker.lifespan(None) as state:
        handles = await run_tasks(state, 5)
    assert [tracker.get(h.task_id) for h in handles] == [None, None, *handles[2:]]
    assert repr(tracker) == "<TaskTracker in_flight=0 history=3>"


class _Run:
    """Stands for the run that could cut the tasks off: never asked to here."""

    async def cancel(self, reason: str) -> None:
        raise AssertionError("no drain in this test")


class _QueuedOnly:
    """An observer that hears only that tasks are queued (as a store writer
    could, if it wrote nothing else)."""

    def __init__(self, heard: list[str]) -> None:
        self.heard = heard

    def task_queued(self, handle: TaskHandle, run: Any) -> None:
        self.heard.append(f"queued {handle.name}")

    task_started = task_ended = task_handed_off = None


class _StartedOnly:
    def __init__(self, heard: list[str]) -> None:
        self.heard = heard

    task_queued = task_ended = task_handed_off = None

    def task_started(self, handle: TaskHandle) -> None:
        self.heard.append(f"started {handle.name} attempt {handle.attempts}")


class _EndedOnly:
    def __init__(self, heard: list[str]) -> None:
        self.heard = heard

    task_queued = task_started = task_handed_off = None

    def task_ended(self, handle: TaskHandle) -> None:
        self.heard.append(f"ended {handle.name} {handle.status}")


@pytest.mark.anyio
async def test_a_history_of_zero_keeps_only_live_tasks() -> None:
    tracker = TaskTracker(history_size=0)
    async with tracker.lifespan(None) as state:
        handles = await run_tasks(state, 2)
    assert [tracker.get(h.task_id) for h in handles] == [None, None]


@pytest.mark.anyio
async def test_expired_handles_leave_memory_as_tasks_keep_ending() -> None:
    """Without a lookup, the history sheds what has expired as tasks end."""
    tracker = TaskTracker(history_ttl=1e-9)
    async with tracker.lifespan(None) as state:
        await run_tasks(state, 255)
        assert repr(tracker) == "<TaskTracker in_flight=0 history=0>"


@pytest.mark.anyio
async def test_get_drops_expired_handles_on_the_real_clock() -> None:
    tracker = TaskTracker(history_ttl=1e-9)
    async with tracker.lifespan(None) as state:
        (handle,) = await run_tasks(state, 1)
    # A nanosecond of age, and the drain ran since: gone by the time anyone asks.
    assert tracker.get(handle.task_id) is None


def test_memory_stays_flat_and_each_task_costs_a_few_hundred_bytes(
    anyio_backend: Backend,
) -> None:
    """100,000 tasks through the tracker with a history of 100: what it keeps
    is the history, whatever the number of tasks (a leak of one small object
    per task would be megabytes). Measured in a process of its own (no
    coverage tracer, no other test's objects): `tests/apps/memory.py`."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.apps.memory", anyio_backend],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["growth_bytes_after_100k_tasks"] < 100 * 1_000, figures
    assert figures["bytes_per_pending_task"] < 1_000, figures
    assert figures["bytes_per_finished_task_in_history"] < 600, figures


# The status route


@pytest.fixture
def status_app() -> tuple[FastAPI, TaskTracker]:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router(prefix="/tasks", tags=["tasks"]))

    def fails(email: str) -> None:
        raise ValueError(f"no mailbox for {email}")

    @app.post("/queue/{kind}")
    async def queue(kind: str, tasks: BackgroundTasks) -> str:
        func = fails if kind == "failing" else (lambda email: None)
        return tasks.add_task(func, "alice@example.com").task_id

    return app, tracker


@pytest.mark.parametrize("kind", ["done", "failing"])
def test_the_status_route_serves_the_handle(
    kind: str, status_app: tuple[FastAPI, TaskTracker], anyio_backend: Backend
) -> None:
    app, tracker = status_app
    with TestClient(app, backend=anyio_backend) as client:
        task_id = client.post(f"/queue/{kind}").json()
        response = client.get(f"/tasks/{task_id}")
        handle = tracker.get(task_id)
    assert handle is not None
    assert response.status_code == 200
    assert response.json() == handle.to_dict()
    assert response.json()["status"] == ("failed" if kind == "failing" else "done")
    assert response.json()["error"] == ("ValueError" if kind == "failing" else None)
    assert "alice" not in response.text
    assert "mailbox" not in response.text
    tags = app.openapi()["paths"]["/tasks/{task_id}"]["get"]["tags"]
    assert tags == ["tasks"]


@pytest.mark.parametrize(
    "task_id",
    [
        "0" * 32,  # well formed, unknown
        "0" * 31,
        "0" * 33,
        "g" * 32,
        "{id}%0A",
        "{id}%20",
        "%2E%2E%2F{id}",
        "../{id}",
        "..%2F..%2Fetc%2Fpasswd",
        "x" * 10_000,
        "é" * 32,
        "\u0660" * 32,  # Arabic-Indic digits: \d would take them, [0-9] does not
        "\uff10" * 32,  # fullwidth zeros
        "{id}%00",
    ],
)
def test_the_status_route_answers_404_to_any_other_id(
    task_id: str, status_app: tuple[FastAPI, TaskTracker], anyio_backend: Backend
) -> None:
    app, _ = status_app
    with TestClient(app, backend=anyio_backend) as client:
        real = client.post("/queue/done").json()
        path = "/tasks/" + task_id.replace("{id}", real).replace("{ID}", real.upper())
        response = client.get(path)
    assert response.status_code == 404
    assert "Traceback" not in response.text
    assert len(response.content) < 200


def test_the_status_route_accepts_the_uppercase_spelling_of_an_id(
    status_app: tuple[FastAPI, TaskTracker], anyio_backend: Backend
) -> None:
    app, _ = status_app
    with TestClient(app, backend=anyio_backend) as client:
        real = client.post("/queue/done").json()
        response = client.get(f"/tasks/{real.upper()}")
    assert response.status_code == 200
    assert response.json()["task_id"] == real


# Validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drain_timeout": -1}, "drain_timeout must be a number of seconds >= 0"),
        ({"drain_timeout": math.nan}, "drain_timeout must be a number of seconds >= 0"),
        ({"drain_timeout": "30"}, "drain_timeout must be a number of seconds >= 0"),
        ({"drain_timeout": True}, "drain_timeout must be a number of seconds >= 0"),
        ({"history_size": -1}, "history_size must be an int >= 0"),
        ({"history_size": 10.5}, "history_size must be an int >= 0"),
        ({"history_size": False}, "history_size must be an int >= 0"),
        ({"history_ttl": 0}, "history_ttl must be a number of seconds > 0, or None"),
        ({"history_ttl": -5.0}, "history_ttl must be a number of seconds > 0, or None"),
        ({"history_ttl": math.nan}, "history_ttl must be a number of seconds > 0, or None"),
        ({"thread_limit": 0}, "thread_limit must be an int >= 1, or None"),
        ({"thread_limit": 2.0}, "thread_limit must be an int >= 1, or None"),
        ({"thread_limit": True}, "thread_limit must be an int >= 1, or None"),
    ],
)
def test_bad_arguments_say_what_is_valid(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskTracker(**kwargs)


def test_unbounded_values_are_valid() -> None:
    tracker = TaskTracker(drain_timeout=math.inf, history_ttl=None, history_size=0)
    assert tracker.drain_timeout == math.inf


# The drain at shutdown


@pytest.mark.anyio
async def test_with_no_task_in_flight_shutdown_returns_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = TaskTracker(drain_timeout=math.inf)  # would hang if it waited
    async with tracker.lifespan(None) as state:
        await run_tasks(state, 3)
    assert "waiting" not in " ".join(r.getMessage() for r in drain_records(caplog))
    assert summary(caplog).endswith(
        "(0 in flight at shutdown); since startup: 3 done, 0 failed, 0 abandoned"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("drain_timeout", [30.0, math.inf])
async def test_shutdown_waits_for_tasks_in_flight_and_those_queued_meanwhile(
    drain_timeout: float, caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    """The drain wakes when the last task ends, well before its deadline;
    tasks queued while it waits are tracked and waited for too; none of them
    is reported lost."""
    tracker = TaskTracker(drain_timeout=drain_timeout)
    first_running, release_first, release_second = anyio.Event(), anyio.Event(), anyio.Event()
    handles: list[TaskHandle] = []
    shut_down = False

    async def first() -> None:
        first_running.set()
        await release_first.wait()
        raise ValueError("fails during the drain")

    async def request(state: Mapping[str, Any], func: Callable[[], Awaitable[None]]) -> None:
        async with request_tasks(state) as tasks:
            handles.append(tasks.add_task(func))

    async def during_the_drain(state: Mapping[str, Any]) -> None:
        await anyio.wait_all_tasks_blocked()
        assert not shut_down
        assert tracker.in_flight == handles
        tg.start_soon(request, state, release_second.wait)
        await anyio.wait_all_tasks_blocked()
        release_first.set()
        await anyio.wait_all_tasks_blocked()
        assert tracker.in_flight == handles[1:]
        assert not shut_down  # still waiting for the task queued meanwhile
        release_second.set()

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(None) as state:
            tg.start_soon(request, state, first)
            await first_running.wait()
            tg.start_soon(during_the_drain, state)
        shut_down = True
    assert [h.status for h in handles] == ["failed", "done"]
    assert not [e for e in sent if e.signal == "task_abandoned"]
    assert not [r for r in drain_records(caplog) if "abandoned:" in r.getMessage()]
    line = summary(caplog)
    assert line.endswith("(1 in flight at shutdown); since startup: 1 done, 1 failed, 0 abandoned")
    assert [r.levelname for r in drain_records(caplog) if r.getMessage() == line] == ["INFO"]


@pytest.mark.anyio
async def test_past_drain_timeout_every_unfinished_task_is_cut_off_and_named(
    caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    """A running async task, the task queued behind it, a sync task blocked
    in its thread and a request whose collection has not started yet: all end
    cancelled, each with `task_abandoned`, a reason and a WARNING naming it."""
    tracker = TaskTracker(drain_timeout=0)
    async_running, sync_running, queued = anyio.Event(), anyio.Event(), anyio.Event()
    sent_at_once, sent_after_shutdown = anyio.Event(), anyio.Event()
    sent_at_once.set()
    unblock = threading.Event()
    handles: dict[str, TaskHandle] = {}

    async def forever() -> None:
        async_running.set()
        await anyio.sleep_forever()

    def blocked_in_thread() -> None:
        anyio.from_thread.run_sync(sync_running.set)
        unblock.wait()

    async def never_started() -> None:
        pass  # pragma: no cover

    async def request(
        state: Mapping[str, Any], response_sent: anyio.Event, *funcs: Callable[[], Any]
    ) -> None:
        async with request_tasks(state) as tasks:
            for func in funcs:
                handles[func.__name__] = tasks.add_task(func)
            if not response_sent.is_set():
                queued.set()
            await response_sent.wait()

    try:
        async with anyio.create_task_group() as tg:
            async with tracker.lifespan(None) as state:
                tg.start_soon(request, state, sent_at_once, forever, noop)
                tg.start_soon(request, state, sent_at_once, blocked_in_thread)
                # Still in its endpoint when the application shuts down.
                tg.start_soon(request, state, sent_after_shutdown, never_started)
                await async_running.wait()
                await sync_running.wait()
                await queued.wait()
                assert len(tracker.in_flight) == 4
            assert tracker.in_flight == []
            sent_after_shutdown.set()
    finally:
        unblock.set()
    assert {name: h.status for name, h in handles.items()} == dict.fromkeys(handles, "cancelled")
    abandoned = {
        e.kwargs["handle"].task_id: e.kwargs["reason"] for e in sent if e.signal == "task_abandoned"
    }
    cause = "the application shut down and drain_timeout (0 s) ran out"
    assert abandoned == {
        handles["forever"].task_id: f"{cause}; it was cut off while running",
        handles["noop"].task_id: f"{cause}; it never started",
        handles["blocked_in_thread"].task_id: f"{cause}; it was cut off while running",
        handles["never_started"].task_id: f"{cause}; it never started",
    }
    warnings = [r.getMessage() for r in drain_records(caplog) if r.levelname == "WARNING"]
    for handle in handles.values():
        assert [w for w in warnings if handle.task_id in w and handle.name in w], handle
    assert summary(caplog).endswith(
        "(4 in flight at shutdown); since startup: 0 done, 0 failed, 4 abandoned"
    )


@pytest.mark.anyio
async def test_a_task_that_swallows_its_cancellation_is_still_reported_lost(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = TaskTracker(drain_timeout=0, shutdown_grace=0)
    stubborn = Stubborn()
    handles: list[TaskHandle] = []

    async def request(state: Mapping[str, Any]) -> None:
        async with request_tasks(state) as tasks:
            handles.append(tasks.add_task(stubborn))

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(None) as state:
            tg.start_soon(request, state)
            await stubborn.running.wait()
        assert handles[0].status == "cancelled"
        assert summary(caplog).endswith("0 done, 0 failed, 1 abandoned")
        stubborn.release.set()
    assert handles[0].status == "cancelled"


@pytest.mark.anyio
async def test_tasks_of_a_request_still_in_its_endpoint_never_run_after_the_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = TaskTracker(drain_timeout=0)
    queued, response_sent = anyio.Event(), anyio.Event()
    ran: list[str] = []
    handles: list[TaskHandle] = []

    async def request(state: Mapping[str, Any]) -> None:
        async with request_tasks(state) as tasks:
            handles.append(tasks.add_task(ran.append, "ran"))
            queued.set()
            await response_sent.wait()

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(None) as state:
            tg.start_soon(request, state)
            await queued.wait()
        assert handles[0].status == "cancelled"
        response_sent.set()
    assert ran == []
    assert handles[0].started_at is None
    assert summary(caplog).endswith("0 done, 0 failed, 1 abandoned")


class Secret:
    """An argument that a test can tell is still alive."""


@pytest.mark.anyio
async def test_a_failed_task_in_the_history_keeps_no_argument_alive() -> None:
    """The handle keeps its exception and a traceback that still formats, not
    the frames' local variables: the request's arguments are not retained."""
    tracker = TaskTracker()

    async def fails(secret: Secret) -> None:
        raise ValueError("no mailbox")

    async with tracker.lifespan(None) as state:
        secret = Secret()
        alive = weakref.ref(secret)
        async with request_tasks(state) as tasks:
            handle = tasks.add_task(fails, secret)
            tasks.add_task(noop)
        del tasks, secret
        gc.collect()
        assert alive() is None
    assert tracker.get(handle.task_id) is handle
    assert isinstance(handle.error, ValueError)
    formatted = "".join(traceback.format_exception(handle.error))
    assert "in fails" in formatted
    assert 'raise ValueError("no mailbox")' in formatted
