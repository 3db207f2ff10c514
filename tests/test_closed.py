"""A request's collection is closed once the request is done with it (issue 8).

A task added afterwards, typically from the exit code of a `yield`
dependency, ends `cancelled` at once, loudly, and never masks the request's
own outcome; a tracker never waits for it. Through `TestClient` and httpx's
`ASGITransport` (the `call` fixture of test_fastapi.py), on asyncio and trio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import anyio
import anyio.lowlevel
import httpx2
import pytest
from fastapi import Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from starlette.background import BackgroundTask

from fastapi_bgplus import BackgroundTasks, TaskHandle, TaskTracker, TrackedBackgroundTasks, signals

from .conftest import FASTAPI, Call, Sent

late: list[TaskHandle] = []
ran: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    late.clear()
    ran.clear()


async def alert_ops(what: str) -> None:
    ran.append(what)


async def rollback_and_alert(tasks: BackgroundTasks) -> AsyncIterator[None]:
    """The SQLAlchemy-style dependency of the issue: alert on failure, re-raise."""
    try:
        yield
    except Exception:
        late.append(tasks.add_task(alert_ops, "rolled back"))
        raise


async def audit_after(tasks: BackgroundTasks) -> AsyncIterator[None]:
    yield
    late.append(tasks.add_task(alert_ops, "after yield"))


def sync_audit_after(tasks: BackgroundTasks) -> Iterator[None]:
    """A `def` dependency: FastAPI runs its exit code in a worker thread."""
    yield
    late.append(tasks.add_task(alert_ops, "after yield, in a thread"))


async def failing_dependency() -> None:
    raise HTTPException(status_code=404, detail="no such user")


# FastAPI < 0.121 has no exit stacks: the provider is a `yield` dependency, and
# one that asks for `BackgroundTasks` is entered after it, so exits before it.
# A task such a dependency adds on the way out is queued before the provider
# learns that the request is over: if it failed, it is abandoned with the
# request's tasks (cancelled, loudly, the error stands), for that reason.
FAILED_WORDS = (
    "queued after the request failed" if FASTAPI >= (0, 121) else "the request failed with"
)
# ...and if it succeeded, it runs with them, when the provider's exit is what
# runs them: for a websocket, or a response with a background of its own.
LATE_RUNS_ON_OLD_FASTAPI = pytest.mark.skipif(
    FASTAPI < (0, 121),
    reason="FastAPI < 0.121 has no exit stacks: when the provider's `yield` exit runs the tasks"
    " (a websocket, a response's own background), a dependency that asks for BackgroundTasks"
    " exits before it, so a task it adds after `yield` is queued in time and runs (README,"
    " Supported versions)",
)
# FastAPI < 0.118 exits every `yield` dependency before the response is sent, so
# before the tasks run: a task added after `yield` is queued in time and runs.
LATE_RUNS_BEFORE_0_118 = pytest.mark.skipif(
    FASTAPI < (0, 118),
    reason="FastAPI < 0.118 exits yield dependencies before the response is sent, before the"
    " request's tasks run: a task added after `yield` is queued in time and runs (README,"
    " Supported versions)",
)


def warnings_about(caplog: pytest.LogCaptureFixture, handle: TaskHandle) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "fastapi_bgplus"
        and record.levelno == logging.WARNING
        and handle.task_id in record.getMessage()
    ]


def assert_ended_loudly(
    handle: TaskHandle, sent: list[Sent], caplog: pytest.LogCaptureFixture, words: str
) -> None:
    assert handle.status == "cancelled"
    assert handle.finished_at is not None
    assert handle.started_at is None
    (abandoned,) = [
        e for e in sent if e.signal == "task_abandoned" and e.kwargs["handle"] is handle
    ]
    assert words in abandoned.kwargs["reason"]
    (warning,) = warnings_about(caplog, handle)
    assert handle.name in warning
    assert words in warning
    assert "rolled back" not in ran
    assert "after yield" not in ran


@pytest.mark.parametrize("status", [500, 404])
def test_a_task_added_while_the_request_fails_ends_cancelled_and_the_error_stands(
    status: int, call: Call, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.get("/", dependencies=[Depends(rollback_and_alert)])
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(alert_ops, "queued by the endpoint")
        if status == 404:
            raise HTTPException(status_code=404, detail="no such user")
        raise LookupError("the endpoint broke")

    response = call(app, "GET", "/", raise_server_exceptions=False)
    assert response.status_code == status
    (handle,) = late
    assert_ended_loudly(handle, sent, caplog, FAILED_WORDS)
    assert ran == []


def test_a_task_added_when_a_dependency_fails_ends_cancelled(
    call: Call, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.get("/", dependencies=[Depends(rollback_and_alert), Depends(failing_dependency)])
    async def endpoint() -> None:
        raise AssertionError("never reached")  # pragma: no cover

    response = call(app, "GET", "/", raise_server_exceptions=False)
    assert response.status_code == 404
    (handle,) = late
    assert_ended_loudly(handle, sent, caplog, FAILED_WORDS)


@LATE_RUNS_BEFORE_0_118
@pytest.mark.parametrize("dependency", [audit_after, sync_audit_after])
@pytest.mark.parametrize(
    "own_background", [False, pytest.param(True, marks=LATE_RUNS_ON_OLD_FASTAPI)]
)
def test_a_task_added_after_yield_ends_cancelled_without_masking_the_response(
    dependency: Any,
    own_background: bool,
    call: Call,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After yield, the request's tasks have run: with FastAPI's own background
    tasks or a response's `background=`, with tasks queued or none."""
    app = FastAPI()

    @app.get("/", dependencies=[Depends(dependency)])
    async def endpoint(tasks: BackgroundTasks) -> PlainTextResponse:
        tasks.add_task(alert_ops, "queued by the endpoint")
        own = BackgroundTask(alert_ops, "own background") if own_background else None
        return PlainTextResponse("ok", background=own)

    response = call(app, "GET", "/")
    assert response.status_code == 200
    assert ran == (["own background"] if own_background else []) + ["queued by the endpoint"]
    (handle,) = late
    assert_ended_loudly(handle, sent, caplog, "queued after the request's background tasks had run")


@LATE_RUNS_BEFORE_0_118
def test_a_tracker_never_waits_for_a_late_task(
    anyio_backend: Literal["asyncio", "trio"], caplog: pytest.LogCaptureFixture
) -> None:
    tracker = TaskTracker(drain_timeout=30.0)
    app = FastAPI(lifespan=tracker.lifespan)

    @app.get("/", dependencies=[Depends(audit_after)])
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(alert_ops, "queued by the endpoint")

    caplog.set_level(logging.INFO, logger="fastapi_bgplus")
    with TestClient(app, backend=anyio_backend) as client:
        assert client.get("/").status_code == 200
        (handle,) = late
        assert tracker.in_flight == []
        assert tracker.get(handle.task_id) is handle
    (summary,) = [r.getMessage() for r in caplog.records if "drained" in r.getMessage()]
    assert "0 in flight at shutdown" in summary
    assert "1 done, 0 failed, 1 abandoned" in summary


@LATE_RUNS_ON_OLD_FASTAPI
def test_a_websocket_s_late_task_ends_cancelled(
    anyio_backend: Literal["asyncio", "trio"], sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.websocket("/ws", dependencies=[Depends(audit_after)])
    async def chat(websocket: WebSocket, tasks: BackgroundTasks) -> None:
        await websocket.accept()
        tasks.add_task(alert_ops, "queued by the websocket")
        await websocket.send_text("hi")
        await websocket.close()

    with TestClient(app, backend=anyio_backend) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "hi"
    assert ran == ["queued by the websocket"]
    (handle,) = late
    assert_ended_loudly(handle, sent, caplog, "queued after the request's background tasks had run")


@LATE_RUNS_BEFORE_0_118
@pytest.mark.anyio
@pytest.mark.parametrize("dependency", [audit_after, sync_audit_after])
async def test_async_receivers_hear_a_late_abandon_too(dependency: Any, connect: Any) -> None:
    """`add_task` is synchronous; an `async def` receiver of the late
    `task_abandoned` runs on the event loop, also when the task was added
    from a worker thread, and a raising receiver harms nobody."""
    heard: list[tuple[str, str]] = []
    done = anyio.Event()

    async def on_abandoned(sender: Any, *, handle: TaskHandle, reason: str, **kw: Any) -> None:
        await anyio.lowlevel.checkpoint()
        heard.append((handle.task_id, reason))
        done.set()

    async def raises(sender: Any, **kw: Any) -> None:
        raise RuntimeError("a broken receiver")

    connect(signals.task_abandoned, raises)
    connect(signals.task_abandoned, on_abandoned)
    app = FastAPI()

    @app.get("/", dependencies=[Depends(dependency)])
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(alert_ops, "queued by the endpoint")

    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).status_code == 200
    with anyio.fail_after(5):
        await done.wait()
    (handle,) = late
    assert heard == [(handle.task_id, heard[0][1])]
    assert "after the request's background tasks had run" in heard[0][1]


@LATE_RUNS_BEFORE_0_118
def test_a_late_task_from_a_worker_thread_is_reported_on_the_event_loop(
    anyio_backend: Literal["asyncio", "trio"], connect: Any
) -> None:
    """A `def` dependency's exit code runs in a worker thread; the late task's
    transition is made on the event loop's thread all the same, as every other
    is, so that neither a receiver nor the tracker's books race the loop."""
    loop_thread: list[int] = []
    receiver_threads: list[int] = []

    def on_abandoned(sender: Any, **kw: Any) -> None:
        receiver_threads.append(threading.get_ident())

    connect(signals.task_abandoned, on_abandoned)
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)

    @app.get("/", dependencies=[Depends(sync_audit_after)])
    async def endpoint() -> None:
        loop_thread.append(threading.get_ident())

    with TestClient(app, backend=anyio_backend) as client:
        assert client.get("/").status_code == 200
        (handle,) = late
        assert receiver_threads == loop_thread
        assert handle.status == "cancelled"
        assert tracker.get(handle.task_id) is handle
        assert tracker.in_flight == []


def test_a_hand_built_collection_still_refuses_tasks_once_it_ran() -> None:
    """Only a request's collection is closed; running or adding to a collection
    built by hand after it started stays a programming error (the 0.1 contract)."""
    tasks = BackgroundTasks()

    async def main() -> None:
        await tasks.run()

    anyio.run(main)
    with pytest.raises(RuntimeError, match="already started running"):
        tasks.add_task(alert_ops, "too late")


@LATE_RUNS_BEFORE_0_118
def test_a_sync_receiver_that_raises_is_skipped_for_a_late_abandon(
    call: Call, connect: Any, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    def raises(sender: Any, **kw: Any) -> None:
        raise RuntimeError("a broken receiver")

    connect(signals.task_abandoned, raises)
    app = FastAPI()

    @app.get("/", dependencies=[Depends(audit_after)])
    async def endpoint() -> None:
        pass

    assert call(app, "GET", "/").status_code == 200
    (handle,) = late
    assert [e.kwargs["handle"] for e in sent] == [handle]
    assert any("raised; it was skipped" in r.getMessage() for r in caplog.records)


def test_a_late_task_from_a_foreign_thread_is_still_reported(
    connect: Any, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    """A thread no event loop knows (one the app started itself) cannot run
    an async receiver: the others still hear it, and a WARNING says so."""

    async def never(sender: Any, **kw: Any) -> None:
        raise AssertionError("no loop to run it on")  # pragma: no cover

    connect(signals.task_abandoned, never)
    tasks = TrackedBackgroundTasks.for_request({"type": "http", "app": "the app"})

    async def end() -> None:
        await tasks.end_request(None)

    anyio.run(end)
    assert tasks.app == "the app"
    thread = threading.Thread(target=lambda: late.append(tasks.add_task(alert_ops, "late")))
    thread.start()
    thread.join()
    (handle,) = late
    assert handle.status == "cancelled"
    assert [(e.sender, e.kwargs["handle"]) for e in sent] == [("the app", handle)]
    assert any("no event loop to run it on" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_a_collection_used_as_a_context_ends_its_request_on_exit(sent: list[Sent]) -> None:
    """``async with`` is how the FastAPI provider ends a request's collection:
    leaving the block runs the tasks, or abandons them if it raised; then the
    collection is closed."""
    async with TrackedBackgroundTasks.for_request({"type": "http"}) as tasks:
        done = tasks.add_task(alert_ops, "ran")
    assert done.status == "done"
    assert ran == ["ran"]
    assert tasks.add_task(alert_ops, "late").status == "cancelled"

    failing = TrackedBackgroundTasks.for_request({"type": "http"})
    never = failing.add_task(alert_ops, "never")

    async def block_that_breaks() -> None:
        async with failing:
            raise LookupError("the block broke")

    with pytest.raises(LookupError):
        await block_that_breaks()
    assert never.status == "cancelled"
    assert ran == ["ran"]
    reasons = [e.kwargs["reason"] for e in sent if e.kwargs["handle"] is never]
    assert reasons == ["the request failed with LookupError before its tasks ran; it never started"]
