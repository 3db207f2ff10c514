"""Hostile and odd input to `add_task()` (issue 5).

What can never run is refused at `add_task()` time with a `TypeError` that
says what to do, and nothing is queued. The odd shapes that *can* run do, and
their behaviour is pinned here: a `def` returning an awaitable (awaited), a
`def` that runs its own event loop (works: it is in a worker thread), a task
that raises `SystemExit` (not isolated: it propagates like a cancellation).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
import trio
import trio.lowlevel
from fastapi import FastAPI
from starlette.background import BackgroundTask
from starlette.testclient import TestClient

from fastapi_bgplus import BackgroundTasks, TaskTracker, TrackedBackgroundTasks, signals


async def send_email(address: str) -> None:
    pass


async def agen(address: str) -> AsyncIterator[str]:
    yield address


def gen(address: str) -> Iterator[str]:
    yield address


class Mailer:
    def send(self, address: str) -> None:
        pass

    async def stream(self, address: str) -> AsyncIterator[str]:
        yield address

    def batches(self, address: str) -> Iterator[str]:
        yield address


class AsyncGenCallable:
    async def __call__(self, address: str) -> AsyncIterator[str]:
        yield address


class GenCallable:
    def __call__(self, address: str) -> Iterator[str]:
        yield address


class BareAwaitable:
    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


# (what is passed, words the message must contain)
REFUSED: dict[str, tuple[Callable[[], Any], str]] = {
    "None": (lambda: None, "expects a function or other callable, got 'NoneType'"),
    "an int": (lambda: 42, "expects a function or other callable, got 'int'"),
    "a string": (lambda: "send_email", "expects a function or other callable, got 'str'"),
    "a dict": (lambda: {"func": send_email}, "got 'dict'"),
    "a coroutine object": (
        lambda: send_email("a@example.com"),
        "got a coroutine object (send_email(...)) instead of a function; pass the function"
        " and its arguments instead: add_task(send_email, ",
    ),
    "an awaitable object": (BareAwaitable, "got an awaitable"),
    "an async generator function": (lambda: agen, "generator function (tests.test_hostile.agen)"),
    "a generator function": (lambda: gen, "generator function (tests.test_hostile.gen)"),
    "a partial of an async generator function": (
        lambda: functools.partial(agen, "a@example.com"),
        "generator function (tests.test_hostile.agen)",
    ),
    "a partial of a partial of a generator function": (
        lambda: functools.partial(functools.partial(gen), "a@example.com"),
        "generator function (tests.test_hostile.gen)",
    ),
    "an async generator method": (lambda: Mailer().stream, "generator function"),
    "a generator method": (lambda: Mailer().batches, "generator function"),
    "an object whose __call__ is an async generator": (AsyncGenCallable, "generator function"),
    "an object whose __call__ is a generator": (GenCallable, "generator function"),
}


@pytest.mark.parametrize(("make", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_add_task_refuses_what_can_never_run(make: Callable[[], Any], message: str) -> None:
    tasks = TrackedBackgroundTasks()
    func = make()
    with pytest.raises(TypeError, match=r"^add_task\(\)") as caught:
        tasks.add_task(func, "a@example.com")
    assert message in str(caught.value)
    assert tasks.tasks == []
    assert tasks.handles == []
    if inspect.iscoroutine(func):
        # Closed, so no "coroutine was never awaited" warning follows
        # (filterwarnings=error would turn that into a failure).
        assert inspect.getcoroutinestate(func) == inspect.CORO_CLOSED


def test_a_refused_task_does_not_spoil_the_collection() -> None:
    tasks = TrackedBackgroundTasks()
    first = tasks.add_task(send_email, "a@example.com")
    with pytest.raises(TypeError):
        tasks.add_task(gen, "a@example.com")
    last = tasks.add_task(send_email, "b@example.com")
    assert tasks.handles == [first, last]
    assert len(tasks.tasks) == 2


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(lambda: send_email, id="a bare function"),
        pytest.param(lambda: (send_email, "a@example.com"), id="a tuple"),
        pytest.param(
            lambda: BackgroundTask(send_email("a@example.com")),  # type: ignore[arg-type]
            id="coroutine",
        ),
        pytest.param(lambda: BackgroundTask(agen, "a@example.com"), id="async generator"),
        pytest.param(lambda: BackgroundTask(42), id="non-callable"),  # type: ignore[arg-type]
    ],
)
def test_the_constructor_refuses_what_can_never_run(item: Callable[[], Any]) -> None:
    built = item()
    with pytest.raises(TypeError, match=r"BackgroundTask|add_task"):
        TrackedBackgroundTasks(tasks=[BackgroundTask(send_email, "a@example.com"), built])
    if isinstance(built, BackgroundTask) and inspect.iscoroutine(built.func):
        assert inspect.getcoroutinestate(built.func) == inspect.CORO_CLOSED


def test_refused_tasks_are_never_tracked(anyio_backend: Literal["asyncio", "trio"]) -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        errors = []
        for bad in (None, gen, agen, send_email("a@example.com")):
            try:
                tasks.add_task(bad)  # type: ignore[arg-type]
            except TypeError as exc:
                errors.append(type(exc).__name__)
        return {"errors": errors, "queued": len(tasks.tasks), "tracked": len(tracker.in_flight)}

    with TestClient(app, backend=anyio_backend) as client:
        body = client.post("/").json()
        assert tracker.in_flight == []
    assert body == {"errors": ["TypeError"] * 4, "queued": 0, "tracked": 0}


# Odd shapes that run.


class BuiltByTask(GenCallable):
    built: list[str] = []  # noqa: RUF012

    def __init__(self, address: str) -> None:
        self.built.append(address)


@pytest.mark.anyio
async def test_a_class_is_a_task_that_builds_an_instance() -> None:
    # Its instances' __call__ is a generator, but the task only builds one.
    BuiltByTask.built.clear()
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(BuiltByTask, "a@example.com")
    await tasks()
    assert handle.status == "done"
    assert handle.name == "tests.test_hostile.BuiltByTask"
    assert BuiltByTask.built == ["a@example.com"]


@pytest.mark.anyio
async def test_a_def_that_returns_an_awaitable_has_it_awaited() -> None:
    sent: list[str] = []

    async def send(address: str) -> None:
        await anyio.lowlevel.checkpoint()
        sent.append(address)

    async def fail(address: str) -> None:
        raise ValueError("refused")

    def make_it(address: str) -> Awaitable[None]:
        return send(address)

    tasks = TrackedBackgroundTasks()
    by_def = tasks.add_task(make_it, "a@example.com")
    by_lambda = tasks.add_task(lambda: send("b@example.com"))
    by_partial = tasks.add_task(functools.partial(make_it, "c@example.com"))
    failing = tasks.add_task(lambda: fail("d@example.com"))
    await tasks.run()

    assert sent == ["a@example.com", "b@example.com", "c@example.com"]
    assert [by_def.status, by_lambda.status, by_partial.status] == ["done"] * 3
    # The work is in the awaitable, so its failure is the task's failure.
    assert failing.status == "failed"
    assert isinstance(failing.error, ValueError)


def logged(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator whose wrapper is a plain function, as most are."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


@logged
async def streamed(address: str) -> AsyncIterator[str]:
    yield address


@logged
def batched(address: str) -> Iterator[str]:
    yield address


@pytest.mark.anyio
async def test_a_task_that_returns_a_generator_fails_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # add_task sees a plain function, but the body behind it never runs.
    sent: list[str] = []

    async def send(address: str) -> None:
        sent.append(address)

    tasks = TrackedBackgroundTasks()
    decorated = tasks.add_task(streamed, "a@example.com")
    by_lambda = tasks.add_task(lambda: batched("b@example.com"))
    after = tasks.add_task(send, "c@example.com")
    await tasks.run()

    for handle, name in ((decorated, "streamed"), (by_lambda, "<lambda>")):
        assert handle.status == "failed"
        assert isinstance(handle.error, TypeError)
        assert f"{name} returned a generator object, so its body never ran" in str(handle.error)
    assert after.status == "done"
    assert sent == ["c@example.com"]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert "a@example.com" not in caplog.text


def logged_async(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator whose wrapper is an `async def` that forgot to await."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


@pytest.mark.anyio
async def test_an_async_task_that_returns_unstarted_work_runs_it_or_fails_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[str] = []

    @logged_async
    async def send(address: str) -> None:
        sent.append(address)

    async def answer(address: str) -> str:
        sent.append(address)
        return "a value, not work"

    tasks = TrackedBackgroundTasks()
    coroutine = tasks.add_task(send, "a@example.com")  # returns send's coroutine object
    generator = tasks.add_task(logged_async(batched), "b@example.com")
    async_generator = tasks.add_task(logged_async(agen), "c@example.com")
    value = tasks.add_task(answer, "d@example.com")
    await tasks.run()

    assert sent == ["a@example.com", "d@example.com"]
    assert [coroutine.status, value.status] == ["done", "done"]
    for handle in (generator, async_generator):
        assert handle.status == "failed"
        assert isinstance(handle.error, TypeError)
        assert "returned a generator object, so its body never ran" in str(handle.error)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert "b@example.com" not in caplog.text


@pytest.mark.anyio
async def test_a_def_task_may_run_its_own_event_loop() -> None:
    results: list[tuple[str, int]] = []
    loop_thread = threading.get_ident()

    async def work(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    async def trio_work(n: int) -> int:
        await trio.lowlevel.checkpoint()
        return n * 3

    def with_asyncio(n: int) -> None:
        results.append(("asyncio", asyncio.run(work(n))))
        assert threading.get_ident() != loop_thread

    def with_trio(n: int) -> None:
        results.append(("trio", trio.run(trio_work, n)))

    tasks = TrackedBackgroundTasks()
    handles = [tasks.add_task(with_asyncio, 21), tasks.add_task(with_trio, 14)]
    await tasks.run()

    assert [h.status for h in handles] == ["done", "done"]
    assert results == [("asyncio", 42), ("trio", 42)]


@pytest.mark.anyio
async def test_a_def_task_may_call_back_into_the_event_loop() -> None:
    seen: list[str] = []

    async def on_loop(value: str) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(value)

    def task(value: str) -> None:
        anyio.from_thread.run(on_loop, value)

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(task, "from a worker thread")
    await tasks.run()
    assert handle.status == "done"
    assert seen == ["from a worker thread"]


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
async def test_system_exit_in_a_task_propagates_and_the_rest_are_abandoned(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Only Exception is isolated; SystemExit is not an error of the task but a
    # request to stop, so it travels on, and no task is left unaccounted.
    abandoned: list[str] = []

    def on_abandoned(sender: Any, *, task_id: str, **kwargs: Any) -> None:
        abandoned.append(task_id)

    async def exit_async() -> None:
        raise SystemExit(3)

    def exit_sync() -> None:
        raise SystemExit(3)

    tasks = TrackedBackgroundTasks()
    first = tasks.add_task(exit_async if is_async else exit_sync)
    second = tasks.add_task(send_email, "a@example.com")
    signals.task_abandoned.connect(on_abandoned)
    try:
        with pytest.raises(SystemExit):
            await tasks.run()
    finally:
        signals.task_abandoned.disconnect(on_abandoned)

    assert (first.status, second.status) == ("cancelled", "cancelled")
    assert abandoned == [first.task_id, second.task_id]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert first.task_id in warnings[0]
    assert "cut off while running" in warnings[0]
    assert second.task_id in warnings[1]
    assert "never started" in warnings[1]


class Unprintable:
    """An argument that fails the test if anything formats it."""

    def __repr__(self) -> str:
        raise AssertionError("an argument was formatted")

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        raise AssertionError("an argument was formatted")


@pytest.mark.anyio
async def test_arguments_are_never_formatted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastapi_bgplus")
    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        received.append(kwargs)

    async def fails(arg: Unprintable, *, key: Unprintable) -> None:
        raise ValueError("no")

    def ok(arg: Unprintable, *, key: Unprintable) -> None:
        pass

    tasks = TrackedBackgroundTasks()
    handles = [
        tasks.add_task(fails, Unprintable(), key=Unprintable()),
        tasks.add_task(ok, Unprintable(), key=Unprintable()),
    ]
    for signal in (signals.task_started, signals.task_completed, signals.task_failed):
        signal.connect(receiver)
    try:
        await tasks.run()
    finally:
        for signal in (signals.task_started, signals.task_completed, signals.task_failed):
            signal.disconnect(receiver)

    assert [h.status for h in handles] == ["failed", "done"]
    for handle in handles:
        json.dumps(handle.to_dict())
        repr(handle)
    assert "failed" in caplog.text  # formats every record
    assert len(received) == 4
    assert all(not any(isinstance(v, Unprintable) for v in kw.values()) for kw in received)
