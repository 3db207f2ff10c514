"""The task collection: building it, what `add_task()` takes, order, isolation,
cancellation and the dedicated thread limiter (issue 2)."""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from fastapi_bgplus import (
    DEFAULT_THREAD_LIMIT,
    BackgroundTasks,
    TaskTracker,
    TrackedBackgroundTasks,
    current_thread_limiter,
)

from .conftest import Sent

pytestmark = pytest.mark.anyio

SECRET = "pw-Zx81secret"

# What the module-level tasks did, in order; reset by the autouse fixture.
calls: list[tuple[str, Any]] = []


@pytest.fixture(autouse=True)
def _reset_calls() -> Iterator[None]:
    calls.clear()
    yield
    calls.clear()


async def send_email(address: str, *, subject: str = "Welcome") -> None:
    await anyio.lowlevel.checkpoint()
    calls.append(("send_email", (address, subject)))


def write_audit(entry: str, *, level: str = "info") -> None:
    calls.append(("write_audit", (entry, level)))


async def fail(address: str) -> None:
    raise ValueError("the mail server said no")


def fail_sync(address: str) -> None:
    raise ValueError("the audit log is full")


class AsyncSender:
    async def __call__(self, address: str) -> None:
        calls.append(("AsyncSender", threading.get_ident()))


class SyncSender:
    def __call__(self, address: str) -> None:
        calls.append(("SyncSender", threading.get_ident()))


async def agen(address: str) -> AsyncIterator[str]:
    yield address


def gen(address: str) -> Iterator[str]:
    yield address


class AsyncGenCallable:
    async def __call__(self, address: str) -> AsyncIterator[str]:
        yield address


# Building a collection by hand


def test_the_public_name_builds_a_tracked_collection() -> None:
    tasks = BackgroundTasks()
    assert type(tasks) is TrackedBackgroundTasks
    assert tasks.tasks == []
    assert tasks.handles == []


def test_the_collection_is_a_starlette_background_task() -> None:
    tasks = BackgroundTasks()
    assert isinstance(tasks, StarletteBackgroundTasks)
    assert isinstance(tasks, BackgroundTask)


async def test_starlette_background_tasks_passed_to_the_constructor_are_tracked() -> None:
    tasks = BackgroundTasks(
        tasks=[
            BackgroundTask(send_email, "a@example.com", subject="Hi"),
            BackgroundTask(write_audit, "signed up", level="debug"),
        ]
    )
    assert [handle.name for handle in tasks.handles] == [
        f"{__name__}.send_email",
        f"{__name__}.write_audit",
    ]
    assert all(handle.status == "pending" for handle in tasks.handles)
    await tasks.run()
    assert calls == [
        ("send_email", ("a@example.com", "Hi")),
        ("write_audit", ("signed up", "debug")),
    ]
    assert [handle.status for handle in tasks.handles] == ["done", "done"]


async def test_a_starlette_collection_passed_to_the_constructor_runs_whole() -> None:
    inner = StarletteBackgroundTasks()
    inner.add_task(write_audit, "first")
    inner.add_task(send_email, "b@example.com")
    tasks = TrackedBackgroundTasks(tasks=[inner])
    assert len(tasks.handles) == 1
    await tasks.run()
    assert calls == [
        ("write_audit", ("first", "info")),
        ("send_email", ("b@example.com", "Welcome")),
    ]
    assert tasks.handles[0].status == "done"


@pytest.mark.parametrize(
    "item",
    [write_audit, "write_audit", None],
    ids=["function", "string", "none"],
)
def test_the_constructor_refuses_what_is_not_a_background_task(item: Any) -> None:
    with pytest.raises(TypeError, match=r"BackgroundTask objects.*add_task\(func"):
        TrackedBackgroundTasks(tasks=[BackgroundTask(write_audit, "ok"), item])


def test_the_constructor_refuses_a_background_task_that_could_never_run() -> None:
    with pytest.raises(TypeError, match="generator"):
        TrackedBackgroundTasks(tasks=[BackgroundTask(agen, "x")])


async def test_await_the_collection_runs_it() -> None:
    tasks = BackgroundTasks()
    handle = tasks.add_task(write_audit, "called")
    await tasks()
    assert handle.status == "done"
    assert calls == [("write_audit", ("called", "info"))]


@pytest.mark.parametrize("second", ["run", "call"])
async def test_a_collection_runs_once(second: str) -> None:
    tasks = BackgroundTasks()
    tasks.add_task(write_audit, "once")
    await tasks.run()
    with pytest.raises(RuntimeError, match=r"already run.*runs once"):
        await (tasks.run() if second == "run" else tasks())
    assert calls == [("write_audit", ("once", "info"))]


async def test_adding_to_a_running_collection_is_refused_and_queues_nothing() -> None:
    tasks = BackgroundTasks()
    refused: list[BaseException] = []

    def add_more() -> None:
        try:
            tasks.add_task(write_audit, "too late")
        except RuntimeError as exc:
            refused.append(exc)

    tasks.add_task(add_more)
    await tasks.run()
    assert len(refused) == 1
    assert "already started running" in str(refused[0])
    with pytest.raises(RuntimeError, match="already started running"):
        tasks.add_task(write_audit, "after the end")
    assert len(tasks.tasks) == len(tasks.handles) == 1
    assert calls == []


def starlette_app(make: Callable[[], TrackedBackgroundTasks]) -> Starlette:
    def endpoint(request: Request) -> Response:
        tasks = make()
        calls.append(("handles", tasks.handles))
        return PlainTextResponse("ok", background=tasks)

    return Starlette(routes=[Route("/", endpoint)])


def test_runs_as_a_starlette_response_background(
    anyio_backend: Literal["asyncio", "trio"],
) -> None:
    def make() -> TrackedBackgroundTasks:
        tasks = BackgroundTasks()
        tasks.add_task(send_email, "c@example.com")
        tasks.add_task(write_audit, "sent")
        return tasks

    with TestClient(starlette_app(make), backend=anyio_backend) as client:
        assert client.get("/").text == "ok"
    (_, handles), *ran = calls
    assert ran == [("send_email", ("c@example.com", "Welcome")), ("write_audit", ("sent", "info"))]
    assert [handle.status for handle in handles] == ["done", "done"]


def test_runs_as_a_fastapi_response_background(
    anyio_backend: Literal["asyncio", "trio"],
) -> None:
    app = FastAPI()
    handles = []

    @app.get("/")
    async def endpoint() -> Response:
        tasks = BackgroundTasks()
        handles.append(tasks.add_task(write_audit, "by hand"))
        return PlainTextResponse("ok", background=tasks)

    with TestClient(app, backend=anyio_backend) as client:
        assert client.get("/").text == "ok"
    assert calls == [("write_audit", ("by hand", "info"))]
    assert handles[0].status == "done"


# What add_task() accepts


async def test_add_task_accepts_every_kind_of_callable() -> None:
    async def local_async(value: int) -> None:
        calls.append(("local_async", value))

    def local_sync(value: int) -> None:
        calls.append(("local_sync", value))

    tasks = BackgroundTasks()
    handles = [
        tasks.add_task(send_email, "a@example.com", subject="s1"),
        tasks.add_task(write_audit, "e1", level="warn"),
        tasks.add_task(lambda: calls.append(("lambda", None))),
        tasks.add_task(functools.partial(send_email, "p@example.com"), subject="s2"),
        tasks.add_task(functools.partial(write_audit, level="debug"), "e2"),
        tasks.add_task(functools.partial(functools.partial(local_async), 7)),
        tasks.add_task(local_sync, 8),
    ]
    await tasks.run()
    assert calls == [
        ("send_email", ("a@example.com", "s1")),
        ("write_audit", ("e1", "warn")),
        ("lambda", None),
        ("send_email", ("p@example.com", "s2")),
        ("write_audit", ("e2", "debug")),
        ("local_async", 7),
        ("local_sync", 8),
    ]
    assert all(handle.status == "done" for handle in handles)


async def test_async_tasks_run_on_the_loop_and_sync_ones_in_a_thread() -> None:
    loop_thread = threading.get_ident()

    async def async_function() -> None:
        calls.append(("async_function", threading.get_ident()))

    def sync_function() -> None:
        calls.append(("sync_function", threading.get_ident()))

    tasks = BackgroundTasks()
    tasks.add_task(AsyncSender(), "a@example.com")
    tasks.add_task(functools.partial(AsyncSender(), "b@example.com"))
    tasks.add_task(async_function)
    tasks.add_task(SyncSender(), "c@example.com")
    tasks.add_task(sync_function)
    await tasks.run()
    assert [(name, thread == loop_thread) for name, thread in calls] == [
        ("AsyncSender", True),
        ("AsyncSender", True),
        ("async_function", True),
        ("SyncSender", False),
        ("sync_function", False),
    ]


async def test_a_def_that_returns_an_awaitable_has_it_awaited() -> None:
    tasks = BackgroundTasks()
    handle = tasks.add_task(lambda: send_email("d@example.com", subject="lazy"))
    await tasks.run()
    assert calls == [("send_email", ("d@example.com", "lazy"))]
    assert handle.status == "done"


# What add_task() refuses


def assert_nothing_queued(tasks: TrackedBackgroundTasks) -> None:
    assert tasks.tasks == []
    assert tasks.handles == []


@pytest.mark.parametrize(
    ("func", "message"),
    [
        (42, r"expects a function or other callable, got 'int'.*add_task\(send_email, "),
        ("send_email", r"got 'str'.*add_task\(send_email, "),
        (agen, r"generator function \(tests\.test_tasks\.agen\).*plain 'def' or 'async def'"),
        (gen, r"generator function \(tests\.test_tasks\.gen\)"),
        (functools.partial(agen, "x"), r"generator function \(tests\.test_tasks\.agen\)"),
        (AsyncGenCallable(), r"generator function \(tests\.test_tasks\.AsyncGenCallable\)"),
    ],
    ids=["int", "str", "async-generator", "generator", "partial-generator", "generator-call"],
)
def test_add_task_refuses_what_can_never_run(func: Any, message: str) -> None:
    tasks = BackgroundTasks()
    with pytest.raises(TypeError, match=message):
        tasks.add_task(func)
    assert_nothing_queued(tasks)


def test_add_task_refuses_a_coroutine_object_and_closes_it() -> None:
    tasks = BackgroundTasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coroutine = send_email("a@example.com")
        with pytest.raises(TypeError) as excinfo:
            tasks.add_task(coroutine)  # type: ignore[arg-type]
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
        del coroutine
        gc.collect()
    assert [str(warning.message) for warning in caught] == []
    message = str(excinfo.value)
    assert message == (
        "add_task() got a coroutine object (send_email(...)) instead of a function;"
        " pass the function and its arguments instead: add_task(send_email, *args, **kwargs)"
    )
    assert_nothing_queued(tasks)


def test_add_task_refuses_any_other_awaitable() -> None:
    class Pending:
        def __await__(self) -> Iterator[None]:
            yield None

    tasks = BackgroundTasks()
    with pytest.raises(TypeError, match=r"^add_task\(\) got an awaitable \(.*Pending\(\.\.\.\)\)"):
        tasks.add_task(Pending())  # type: ignore[arg-type]
    assert_nothing_queued(tasks)


# Order and error isolation


async def test_tasks_run_one_after_the_other_in_the_order_added() -> None:
    async def slow(name: str) -> None:
        calls.append((name, "start"))
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        calls.append((name, "end"))

    def blocking(name: str) -> None:
        calls.append((name, "start"))
        calls.append((name, "end"))

    tasks = BackgroundTasks()
    tasks.add_task(slow, "a")
    tasks.add_task(blocking, "b")
    tasks.add_task(slow, "c")
    tasks.add_task(blocking, "d")
    await tasks.run()
    assert calls == [(name, edge) for name in "abcd" for edge in ("start", "end")]


async def test_a_failing_task_does_not_stop_the_next(
    caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    """The inverse of Starlette's test_multi_tasks_failure_avoids_next_execution."""
    tasks = BackgroundTasks()
    first = tasks.add_task(fail, SECRET)
    second = tasks.add_task(fail_sync, SECRET)
    third = tasks.add_task(send_email, SECRET, subject=SECRET)
    await tasks.run()

    assert calls == [("send_email", (SECRET, SECRET))]
    assert [first.status, second.status, third.status] == ["failed", "failed", "done"]
    assert isinstance(first.error, ValueError)
    assert isinstance(second.error, ValueError)
    assert third.error is None

    failures = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.name for record in failures] == ["fastapi_bgplus", "fastapi_bgplus"]
    for record, handle in zip(failures, (first, second), strict=True):
        message = record.getMessage()
        assert handle.task_id in message
        assert handle.name in message
        assert record.exc_info is not None
        assert record.exc_info[1] is handle.error
    assert "Traceback (most recent call last)" in caplog.text
    assert "ValueError: the mail server said no" in caplog.text

    failed = [event for event in sent if event.signal == "task_failed"]
    assert [event.kwargs["handle"] for event in failed] == [first, second]
    assert [event.kwargs["error"] for event in failed] == [first.error, second.error]


async def test_task_arguments_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tasks = BackgroundTasks()
    tasks.add_task(fail, SECRET)
    tasks.add_task(fail_sync, address=SECRET)
    tasks.add_task(functools.partial(fail, SECRET))
    await tasks.run()
    assert len(caplog.records) == 3
    assert SECRET not in caplog.text
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.args)


# Cancellation


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked"])
async def test_cancelling_the_runner_abandons_the_running_and_queued_tasks(
    tracked: bool, caplog: pytest.LogCaptureFixture, sent: list[Sent]
) -> None:
    runner = anyio.CancelScope()

    async def cancel_the_runner() -> None:
        runner.cancel()
        await anyio.sleep_forever()

    async with TaskTracker().lifespan(None) as state:
        scope = {"type": "http", "state": dict(state)}
        tasks = TrackedBackgroundTasks.for_request(scope) if tracked else BackgroundTasks()
        done = tasks.add_task(write_audit, "before")
        running = tasks.add_task(cancel_the_runner)
        queued = [tasks.add_task(send_email, "q@example.com"), tasks.add_task(write_audit, "never")]
        with runner:
            await tasks.run()
        assert runner.cancelled_caught
        assert calls == [("write_audit", ("before", "info"))]
        assert done.status == "done"
        assert [handle.status for handle in (running, *queued)] == ["cancelled"] * 3
        assert running.started_at is not None
        assert all(handle.started_at is None for handle in queued)

        abandoned = [event for event in sent if event.signal == "task_abandoned"]
        assert [event.kwargs["handle"] for event in abandoned] == [running, *queued]
        assert "cut off while running" in abandoned[0].kwargs["reason"]
        assert all("never started" in event.kwargs["reason"] for event in abandoned[1:])
        warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.name for r in warnings_logged] == ["fastapi_bgplus"] * 3
        for record, handle in zip(warnings_logged, (running, *queued), strict=True):
            assert handle.task_id in record.getMessage()
            assert handle.name in record.getMessage()


async def test_a_cut_off_at_the_same_time_as_another_cancel_still_propagates(
    sent: list[Sent],
) -> None:
    """The drain's cut-off is swallowed where the collection runs; a caller's
    cancellation that lands with it is not lost."""
    outer = anyio.CancelScope()
    started = anyio.Event()

    async def wait_forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with TaskTracker().lifespan(None) as state:
        tasks = TrackedBackgroundTasks.for_request({"type": "http", "state": dict(state)})
        handles = [tasks.add_task(wait_forever), tasks.add_task(write_audit, "never")]

        async def cut_off_and_cancel() -> None:
            await started.wait()
            tasks.cancel("the drain cut it off")
            outer.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cut_off_and_cancel)
            with outer:
                await tasks.run()
                # Level-triggered: at the latest, the next checkpoint raises.
                await anyio.lowlevel.checkpoint()
                raise AssertionError("the caller's cancellation was swallowed")  # pragma: no cover
        assert outer.cancelled_caught
    assert [handle.status for handle in handles] == ["cancelled", "cancelled"]
    reasons = [e.kwargs["reason"] for e in sent if e.signal == "task_abandoned"]
    assert reasons == [
        "the drain cut it off; it was cut off while running",
        "the drain cut it off; it never started",
    ]


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Task.uncancel() is Python 3.11+; 3.10 has no count"
)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's own Task.cancel()
async def test_a_native_cancel_with_the_cut_off_propagates() -> None:
    """On asyncio the cut-off cancels the host task natively and takes back
    only its own cancellation (`Task.uncancel`): one more propagates."""
    import asyncio

    started = anyio.Event()

    async def wait_forever() -> None:
        started.set()
        await anyio.sleep_forever()

    host = asyncio.current_task()
    assert host is not None
    async with TaskTracker().lifespan(None) as state:
        tasks = TrackedBackgroundTasks.for_request({"type": "http", "state": dict(state)})
        handle = tasks.add_task(wait_forever)

        async def cut_off_and_cancel() -> None:
            await started.wait()
            tasks.cancel("the drain cut it off")
            host.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cut_off_and_cancel)
            with pytest.raises(asyncio.CancelledError):
                await tasks.run()
            host.uncancel()
    assert handle.status == "cancelled"


async def test_a_deadline_on_the_runner_abandons_the_tasks_and_propagates(
    sent: list[Sent],
) -> None:
    never = anyio.Event()

    async def wait_forever() -> None:
        await never.wait()

    tasks = BackgroundTasks()
    handles = [tasks.add_task(wait_forever), tasks.add_task(write_audit, "never")]
    with anyio.move_on_after(0.01) as scope:
        await tasks.run()
    assert scope.cancelled_caught
    assert [handle.status for handle in handles] == ["cancelled", "cancelled"]
    assert [event.kwargs["handle"] for event in sent if event.signal == "task_abandoned"] == handles
    assert calls == []


async def test_cancelling_a_sync_task_abandons_it_without_waiting_for_its_thread(
    sent: list[Sent],
) -> None:
    runner = anyio.CancelScope()
    release = threading.Event()
    returned = threading.Event()

    def blocking() -> None:
        try:
            anyio.from_thread.run_sync(runner.cancel)
            release.wait(10)
        finally:
            returned.set()

    tasks = BackgroundTasks()
    running = tasks.add_task(blocking)
    queued = tasks.add_task(write_audit, "never")
    with runner:
        await tasks.run()
    try:
        assert runner.cancelled_caught
        assert not returned.is_set()
        assert [running.status, queued.status] == ["cancelled", "cancelled"]
        abandoned = [event.kwargs["handle"] for event in sent if event.signal == "task_abandoned"]
        assert abandoned == [running, queued]
    finally:
        release.set()
        await anyio.to_thread.run_sync(returned.wait, 10)
    assert calls == []


# The dedicated thread limiter


async def test_sync_tasks_do_not_use_the_default_thread_limiter() -> None:
    default = anyio.to_thread.current_default_thread_limiter()
    assert current_thread_limiter() is not default
    total = default.total_tokens
    default.total_tokens = 1
    try:
        async with default:  # every default worker thread is busy
            tasks = BackgroundTasks()
            handle = tasks.add_task(write_audit, "still runs")
            with anyio.fail_after(10):
                await tasks.run()
    finally:
        default.total_tokens = total
    assert handle.status == "done"
    assert calls == [("write_audit", ("still runs", "info"))]


@pytest.fixture
def limiter() -> Iterator[Callable[[], anyio.CapacityLimiter]]:
    """`current_thread_limiter()`, its size restored after the test."""
    sizes: list[tuple[anyio.CapacityLimiter, float]] = []

    def get() -> anyio.CapacityLimiter:
        limiter = current_thread_limiter()
        sizes.append((limiter, limiter.total_tokens))
        return limiter

    yield get
    for limiter, size in reversed(sizes):
        limiter.total_tokens = size


async def test_the_dedicated_limiter_bounds_sync_tasks(
    limiter: Callable[[], anyio.CapacityLimiter],
) -> None:
    threads = limiter()
    threads.total_tokens = 1
    tasks = BackgroundTasks()
    handle = tasks.add_task(write_audit, "waits for a token")
    async with anyio.create_task_group() as tg:
        async with threads:  # the one token
            tg.start_soon(tasks.run)
            await anyio.wait_all_tasks_blocked()
            assert threads.statistics().tasks_waiting == 1
            assert calls == []
        await handle.wait()
    assert calls == [("write_audit", ("waits for a token", "info"))]


async def test_async_tasks_do_not_take_thread_tokens(
    limiter: Callable[[], anyio.CapacityLimiter],
) -> None:
    threads = limiter()
    threads.total_tokens = 1
    async with threads:
        tasks = BackgroundTasks()
        handle = tasks.add_task(send_email, "e@example.com")
        await tasks.run()
    assert handle.status == "done"


def test_there_is_one_thread_limiter_per_event_loop(
    anyio_backend: Literal["asyncio", "trio"],
) -> None:
    async def twice() -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        return current_thread_limiter(), current_thread_limiter()

    first, again = anyio.run(twice, backend=anyio_backend)
    assert first is again
    second, _ = anyio.run(twice, backend=anyio_backend)
    assert second is not first
    assert second.total_tokens == DEFAULT_THREAD_LIMIT


async def test_a_collection_repr_counts_its_tasks() -> None:
    tasks = BackgroundTasks()
    tasks.add_task(write_audit, SECRET)
    assert repr(tasks) == "<TrackedBackgroundTasks 1 task(s)>"


class SlottedApp:
    """An ASGI app object that cannot be weakly referenced."""

    __slots__ = ()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never served here")  # pragma: no cover


@pytest.mark.anyio
@pytest.mark.parametrize("make_app", [Starlette, SlottedApp], ids=["an app", "a slotted app"])
async def test_without_a_tracker_each_request_collection_sends_as_its_app(
    make_app: Callable[[], Any], sent: list[Sent]
) -> None:
    # What an app without the tracker's lifespan gets at every request; the
    # reporter kept per app holds it weakly (test_fastapi: it can be collected).
    app, other = make_app(), make_app()
    handles = []
    for owner in (app, app, other):
        tasks = TrackedBackgroundTasks.for_request({"type": "http", "app": owner})
        assert tasks.app is owner
        handles.append(tasks.add_task(write_audit, "entry"))
        await tasks.run()
    completed = [(e.sender, e.kwargs["handle"]) for e in sent if e.signal == "task_completed"]
    assert completed == [(app, handles[0]), (app, handles[1]), (other, handles[2])]
