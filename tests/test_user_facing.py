"""What a user swapping the import meets (issue 8): the messages they read and
the documented differences from `fastapi.BackgroundTasks`.

Apps go through Starlette's `TestClient` on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import fastapi
import pytest
from fastapi import FastAPI, Request, WebSocket
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from fastapi_bgplus import BackgroundTasks, TaskHandle, TrackedBackgroundTasks, signals

from .conftest import Sent

Backend = Literal["asyncio", "trio"]


async def send_email(address: str) -> None:
    pass


# A forgotten pair of parentheses: `add_task(send_email(address))`.

COROUTINE_MESSAGE = (
    "add_task() got a coroutine object (send_email(...)) instead of a function; pass the"
    " function and its arguments instead: add_task(send_email, *args, **kwargs)"
)


def test_add_task_names_a_coroutine_object_and_shows_the_fix() -> None:
    tasks = BackgroundTasks()
    with pytest.raises(TypeError) as caught:
        tasks.add_task(send_email("ada@example.com"))  # type: ignore[arg-type]
    assert str(caught.value) == COROUTINE_MESSAGE
    assert tasks.tasks == []


def test_the_constructor_names_a_coroutine_object_too() -> None:
    coroutine = send_email("ada@example.com")
    with pytest.raises(TypeError) as caught:
        TrackedBackgroundTasks(tasks=[BackgroundTask(coroutine)])  # type: ignore[arg-type]
    assert str(caught.value) == COROUTINE_MESSAGE


# Error isolation: the app's error handlers and error middleware no longer see
# a task's failure (Starlette's tests/middleware/test_errors.py
# `test_background_task`, inverted). It goes to the `fastapi_bgplus` logger
# and to `task_failed` instead.


class CardDeclined(Exception):
    pass


def charge_card(address: str) -> None:
    raise CardDeclined("card of ada@example.com declined")


class ErrorReporting:
    """A pure ASGI error middleware, the shape error trackers' middleware takes."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.seen.append(f"middleware: {type(exc).__name__}")
            raise


def assert_reported_as_failed(
    caplog: pytest.LogCaptureFixture, sent: list[Sent], handle: TaskHandle
) -> None:
    """Where a task failure goes instead: an ERROR record with its traceback on
    the `fastapi_bgplus` logger, and `task_failed` with the exception."""
    assert handle.status == "failed"
    (record,) = [record for record in caplog.records if handle.task_id in record.getMessage()]
    assert (record.name, record.levelno) == ("fastapi_bgplus", logging.ERROR)
    assert record.exc_info is not None
    assert record.exc_info[0] is CardDeclined
    assert "charge_card" in record.getMessage()
    (failed,) = [signal for signal in sent if signal.signal == "task_failed"]
    assert failed.kwargs["handle"] is handle
    assert isinstance(failed.kwargs["error"], CardDeclined)


def test_server_error_middleware_no_longer_sees_a_task_failure(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    seen: list[str] = []
    handles: list[TaskHandle] = []

    async def error_handler(request: Request, exc: Exception) -> Response:
        seen.append(f"handler: {type(exc).__name__}")
        return PlainTextResponse("Internal Server Error", status_code=500)

    async def starlette_endpoint(request: Request) -> Response:
        return Response(status_code=204, background=BackgroundTask(charge_card, "ada@example.com"))

    async def bgplus_endpoint(request: Request) -> Response:
        tasks = BackgroundTasks()
        handles.append(tasks.add_task(charge_card, "ada@example.com"))
        return Response(status_code=204, background=tasks)

    routes = [Route("/starlette", starlette_endpoint), Route("/bgplus", bgplus_endpoint)]
    app = ServerErrorMiddleware(Starlette(routes=routes), handler=error_handler)
    with TestClient(app, backend=anyio_backend, raise_server_exceptions=False) as client:
        assert client.get("/starlette").status_code == 204
        assert seen == ["handler: CardDeclined"]
        seen.clear()
        assert client.get("/bgplus").status_code == 204
    assert seen == []
    assert_reported_as_failed(caplog, sent, handles[0])


def test_exception_handlers_and_error_middleware_no_longer_see_a_task_failure(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    seen: list[str] = []
    handles: list[TaskHandle] = []
    app = FastAPI()
    app.add_middleware(ErrorReporting, seen=seen)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        seen.append(f"exception_handler: {type(exc).__name__}")
        return PlainTextResponse("Internal Server Error", status_code=500)

    @app.post("/fastapi", status_code=202)
    async def with_fastapi(tasks: fastapi.BackgroundTasks) -> None:
        tasks.add_task(charge_card, "ada@example.com")

    @app.post("/bgplus", status_code=202)
    async def with_bgplus(tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(charge_card, "ada@example.com"))

    with TestClient(app, backend=anyio_backend, raise_server_exceptions=False) as client:
        assert client.post("/fastapi").status_code == 202
        assert sorted(seen) == ["exception_handler: CardDeclined", "middleware: CardDeclined"]
        seen.clear()
        assert client.post("/bgplus").status_code == 202
    assert seen == []
    assert_reported_as_failed(caplog, sent, handles[0])


def test_a_task_failed_receiver_hands_the_exception_to_an_error_tracker(
    anyio_backend: Backend, connect: Callable[..., None]
) -> None:
    """The README's wiring: ``capture_exception(error)`` from a receiver."""
    captured: list[BaseException] = []

    def report(sender: Any, *, error: BaseException, **kwargs: Any) -> None:
        captured.append(error)  # sentry_sdk.capture_exception(error)

    connect(signals.task_failed, report)
    app = FastAPI()

    @app.post("/", status_code=202)
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(charge_card, "ada@example.com")

    with TestClient(app, backend=anyio_backend) as client:
        assert client.post("/").status_code == 202
    (error,) = captured
    assert isinstance(error, CardDeclined)
    assert error.__traceback__ is not None


# Websocket endpoints: FastAPI drops the tasks queued there; ours run when the
# endpoint returns, and are reported abandoned when it ends by a disconnect.


def note(done: list[str], what: str) -> None:
    done.append(what)


def websocket_app(done: list[str], handles: list[TaskHandle | None]) -> FastAPI:
    app = FastAPI()

    @app.websocket("/fastapi")
    async def with_fastapi(websocket: WebSocket, tasks: fastapi.BackgroundTasks) -> None:
        handles.append(tasks.add_task(note, done, "fastapi"))  # type: ignore[func-returns-value]
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    @app.websocket("/bgplus")
    async def with_bgplus(websocket: WebSocket, tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(note, done, "bgplus"))
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    return app


def wait_until_ended(handle: TaskHandle | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    assert handle is not None
    while handle.finished_at is None:
        assert time.monotonic() < deadline, f"{handle!r} did not end in {timeout} s"
        time.sleep(0.005)


def test_websocket_tasks_run_when_the_endpoint_returns(
    anyio_backend: Backend, sent: list[Sent]
) -> None:
    done: list[str] = []
    handles: list[TaskHandle | None] = []
    app = websocket_app(done, handles)
    with TestClient(app, backend=anyio_backend) as client:
        for path in ("/fastapi", "/bgplus"):
            with client.websocket_connect(path) as websocket:
                websocket.send_text("hello")
                assert websocket.receive_text() == "hello"
                if path == "/bgplus":
                    # Leaving the block cancels the app (Starlette's test
                    # session does, unlike a server): it would cut the task
                    # off if it has not ended by then.
                    wait_until_ended(handles[-1])
    assert done == ["bgplus"]  # FastAPI dropped its task without a word
    (handle,) = [handle for handle in handles if handle is not None]
    assert handle.status == "done"
    assert [signal.signal for signal in sent] == ["task_started", "task_completed"]


# Starlette's test session hands the endpoint the disconnect and re-raises the
# `WebSocketDisconnect` it ends with. Older ones (0.38, the floor: those with
# `_notify_close`) also cancel the endpoint right after sending the disconnect,
# so whether the endpoint's `WebSocketDisconnect` reaches the client is a race;
# the endpoint ends either way, and its tasks are abandoned either way.
DISCONNECT_SEEN: Callable[[], Any] = (
    (lambda: contextlib.suppress(WebSocketDisconnect))
    if hasattr(WebSocketTestSession, "_notify_close")
    else lambda: pytest.raises(WebSocketDisconnect)
)


def test_a_websocket_disconnect_abandons_the_tasks_with_a_warning(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    done: list[str] = []
    handles: list[TaskHandle | None] = []
    app = websocket_app(done, handles)
    with TestClient(app, backend=anyio_backend) as client:
        for path in ("/fastapi", "/bgplus"):
            # The client goes away while the endpoint waits for a message.
            with DISCONNECT_SEEN(), client.websocket_connect(path):
                pass
    assert done == []
    (handle,) = [handle for handle in handles if handle is not None]
    assert handle.status == "cancelled"
    (record,) = [record for record in caplog.records if record.name == "fastapi_bgplus"]
    assert record.levelno == logging.WARNING
    assert handle.task_id in record.getMessage()
    assert "(tests.test_user_facing.note) abandoned" in record.getMessage()
    (abandoned,) = sent
    assert abandoned.signal == "task_abandoned"
    assert abandoned.kwargs["handle"] is handle


# `BackgroundTasks` is an `Annotated` alias, not a class.


def test_isinstance_takes_tracked_background_tasks_not_the_alias(anyio_backend: Backend) -> None:
    checks: dict[str, object] = {}
    app = FastAPI()

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        try:
            isinstance(tasks, BackgroundTasks)
        except TypeError as exc:
            checks["alias"] = exc
        checks["TrackedBackgroundTasks"] = isinstance(tasks, TrackedBackgroundTasks)
        checks["starlette"] = isinstance(tasks, StarletteBackgroundTasks)

    with TestClient(app, backend=anyio_backend) as client:
        client.post("/").raise_for_status()
    assert isinstance(checks.pop("alias"), TypeError)
    assert checks == {"TrackedBackgroundTasks": True, "starlette": True}
