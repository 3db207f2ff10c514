"""Detached mode, ``TaskTracker(detach=True)`` (issue 13), in process.

A FastAPI app is called as a server calls it, over raw ASGI, with the
tracker's lifespan driven directly, on asyncio and trio. The real servers
(uvicorn, gunicorn) are in tests/test_detach_servers.py.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest
from fastapi import Depends, FastAPI

from fastapi_bgplus import BackgroundTasks, TaskHandle, TaskTracker, TrackedBackgroundTasks

from .asgi import request
from .conftest import FASTAPI, Sent

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        FASTAPI < (0, 121),
        reason="FastAPI < 0.121 has no request exit stacks: the injected tasks run in the request",
    ),
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


async def call(app: Any, state: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``POST path`` over raw ASGI, as a server sends it; returns once the
    ASGI call has returned, with the JSON body of the response."""
    status, body = await request(app, state, path)
    assert status == 200, body
    result: dict[str, Any] = body
    return result


class Story:
    """What happened, in order, across the request and its tasks."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.release = anyio.Event()
        self.late: list[TaskHandle] = []
        self.collections: list[TrackedBackgroundTasks] = []


def make_app(tracker: TaskTracker, story: Story) -> FastAPI:
    app = FastAPI(lifespan=tracker.lifespan)

    async def session(tasks: BackgroundTasks) -> AsyncIterator[str]:
        yield "session"
        story.events.append("dependency exited")
        # Exit code that queues a task: the collection is already handed over.
        story.late.append(tasks.add_task(story.events.append, "late task ran"))

    async def slow(name: str) -> None:
        story.events.append(f"{name} started, request_id={request_id.get()}")
        await story.release.wait()
        story.events.append(f"{name} done")

    async def fail() -> None:
        raise ValueError("isolated as ever")

    @app.post("/slow")
    async def queue_slow(
        tasks: BackgroundTasks,
        db: str = Depends(session),
    ) -> dict[str, str]:
        request_id.set("req-1")
        story.collections.append(tasks)
        failing = tasks.add_task(fail)
        handle = tasks.add_task(slow, "slow")
        return {"slow": handle.task_id, "fail": failing.task_id}

    @app.post("/forever")
    async def queue_forever(tasks: BackgroundTasks) -> dict[str, str]:
        running = tasks.add_task(anyio.sleep_forever)
        behind = tasks.add_task(story.events.append, "never")
        return {"running": running.task_id, "behind": behind.task_id}

    return app


def records(caplog: pytest.LogCaptureFixture, level: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastapi_bgplus" and r.levelname == level
    ]


async def test_the_asgi_call_returns_before_the_tasks_run(
    sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    """The request ends at once; the tasks then run in the tracker's task
    group, in the request's context, after its `yield` dependencies exited
    (the price of detaching); handles, isolation, signals and tracking are
    as without detach, and a task queued by a dependency's exit code is
    reported abandoned."""
    tracker = TaskTracker(detach=True)
    story = Story()
    app = make_app(tracker, story)
    async with tracker.lifespan(app) as state:
        with anyio.fail_after(5):  # would hang here without detach
            ids = await call(app, state, "/slow")
        slow, failed = tracker.get(ids["slow"]), tracker.get(ids["fail"])
        assert slow is not None
        assert failed is not None
        assert story.events == ["dependency exited"]
        with pytest.raises(RuntimeError, match="already run"):
            await story.collections[0].run()  # handed over: it runs once, detached
        assert slow.status == "pending"
        assert tracker.in_flight == [failed, slow]
        await anyio.wait_all_tasks_blocked()
        assert slow.status == "running"
        assert story.events == ["dependency exited", "slow started, request_id=req-1"]
        story.release.set()
        await slow.wait()
    assert story.events[-1] == "slow done"
    assert slow.status == "done"
    assert failed.status == "failed"
    assert isinstance(failed.error, ValueError)
    (late,) = story.late
    assert late.status == "cancelled"
    assert "late task ran" not in story.events
    by_task = [(s.signal, s.kwargs["task_id"]) for s in sent if s.sender is app]
    assert by_task == [
        ("task_abandoned", late.task_id),
        ("task_started", failed.task_id),
        ("task_failed", failed.task_id),
        ("task_started", slow.task_id),
        ("task_completed", slow.task_id),
    ]
    (reason,) = [s.kwargs["reason"] for s in sent if s.signal == "task_abandoned"]
    assert "handed to the TaskTracker to run detached (detach=True)" in reason
    assert records(caplog, "ERROR") == [f"Background task {failed.task_id} ({failed.name}) failed"]


async def test_the_drain_waits_for_detached_tasks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")
    tracker = TaskTracker(detach=True, drain_timeout=30.0)
    story = Story()
    app = make_app(tracker, story)
    shut_down = False

    async def release_during_the_drain() -> None:
        await anyio.wait_all_tasks_blocked()
        assert not shut_down
        assert [h.name for h in tracker.in_flight] == [f"{__name__}.make_app.<locals>.slow"]
        story.release.set()

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(app) as state:
            await call(app, state, "/slow")
            tg.start_soon(release_during_the_drain)
        shut_down = True
    assert story.events[-1] == "slow done"
    (summary,) = [line for line in records(caplog, "WARNING") if "drained" in line]
    # The one abandoned: queued by the dependency's exit code, after the handoff.
    assert summary.endswith(
        "(2 in flight at shutdown); since startup: 1 done, 1 failed, 1 abandoned"
    )


async def test_past_drain_timeout_each_detached_task_is_named(
    sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    tracker = TaskTracker(detach=True, drain_timeout=0)
    story = Story()
    app = make_app(tracker, story)
    async with tracker.lifespan(app) as state:
        ids = await call(app, state, "/forever")
        await anyio.wait_all_tasks_blocked()
    handles = {name: tracker.get(task_id) for name, task_id in ids.items()}
    assert {name: h.status for name, h in handles.items() if h} == {
        "running": "cancelled",
        "behind": "cancelled",
    }
    cause = "the application shut down and drain_timeout (0 s) ran out"
    warnings = records(caplog, "WARNING")
    ends = [("running", "it was cut off while running"), ("behind", "it never started")]
    for name, state_of in ends:
        handle = handles[name]
        assert handle is not None
        (line,) = [w for w in warnings if handle.task_id in w]
        assert f"({handle.name}) abandoned: {cause}" in line
        assert line.endswith(state_of)
    assert "never" not in story.events
    assert [s.signal for s in sent] == ["task_started", "task_abandoned", "task_abandoned"]


async def test_a_task_that_ignores_its_cancellation_does_not_hold_up_shutdown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reported lost by the drain and left behind, so that the lifespan
    shutdown ends."""
    tracker = TaskTracker(detach=True, drain_timeout=0, shutdown_grace=0)
    app = FastAPI(lifespan=tracker.lifespan)
    ends: list[str] = []

    async def stubborn() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            ends.append("swallowed the drain's cancellation")
        try:
            await anyio.sleep_forever()
        finally:
            ends.append("cancelled with the task group")

    @app.post("/stubborn")
    async def queue(tasks: BackgroundTasks) -> dict[str, str]:
        return {"id": tasks.add_task(stubborn).task_id}

    with anyio.fail_after(5):
        async with tracker.lifespan(app) as state:
            task_id = (await call(app, state, "/stubborn"))["id"]
            await anyio.wait_all_tasks_blocked()
    handle = tracker.get(task_id)
    assert handle is not None
    assert handle.status == "cancelled"
    # Left behind: on trio, its cancelled scope cancels it again at its next await.
    assert ends[0] == "swallowed the drain's cancellation"


async def test_a_request_ending_after_shutdown_runs_nothing_detached() -> None:
    """Its tasks were reported lost by the drain; with the task group gone,
    the collection settles in the request as without detach."""
    tracker = TaskTracker(detach=True, drain_timeout=0)
    app = FastAPI(lifespan=tracker.lifespan)
    in_endpoint, finish = anyio.Event(), anyio.Event()
    ran: list[str] = []
    handles: list[TaskHandle] = []

    @app.post("/late")
    async def late(tasks: BackgroundTasks) -> dict[str, str]:
        handles.append(tasks.add_task(ran.append, "ran"))
        in_endpoint.set()
        await finish.wait()
        return {}

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(app) as state:
            tg.start_soon(call, app, state, "/late")
            await in_endpoint.wait()
        assert handles[0].status == "cancelled"
        finish.set()
    assert ran == []


def test_detach_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="detach must be True or False, got 1"):
        TaskTracker(detach=1)  # type: ignore[arg-type]
