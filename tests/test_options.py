"""Task options: ``@task(timeout=..., attempts=..., retry_on=...)`` (issue 13)."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest
import stamina
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

from fastapi_bgplus import BackgroundTasks, TaskTracker, TrackedBackgroundTasks, task
from fastapi_bgplus._options import TaskFunction

from ._subprocess import run_python
from .conftest import Sent

pytestmark = pytest.mark.anyio

SECRET = "pw-Zx81secret"


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    """stamina's test mode: no backoff waits; with ``cap=True`` and a high
    cap, every task's own `attempts` is honoured (stamina would otherwise set
    every task's attempts to the mode's `attempts`)."""
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


class Flaky:
    """Raises each error of `errors` in turn, then returns `result`."""

    def __init__(self, *errors: Exception, result: str = "sent") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls: list[str] = []

    def __call__(self, url: str) -> str:
        self.calls.append(url)
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def options_on(flaky: Flaky, kind: str, **options: Any) -> TaskFunction[[str], Any]:
    """`flaky` as a `def` or `async def` task function, with `options`."""
    if kind == "sync":

        def deliver(url: str) -> str:
            return flaky(url)

        return task(**options)(deliver)

    async def deliver_async(url: str) -> str:
        await anyio.lowlevel.checkpoint()
        return flaky(url)

    return task(**options)(deliver_async)


async def ping(flaky: Flaky, url: str) -> None:
    await anyio.lowlevel.checkpoint()
    flaky(url)


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fastapi_bgplus"]


# Calling it directly


async def test_calling_the_decorated_function_calls_the_plain_function() -> None:
    @task(timeout=1.0, attempts=2, retry_on=ConnectionError)
    async def deliver(url: str, *, tries: int = 1) -> str:
        """Deliver a webhook."""
        raise ConnectionError(url)

    @task(timeout=1.0)
    def render(name: str) -> str:
        return f"hello {name}"

    assert render("ada") == "hello ada"
    with pytest.raises(ConnectionError):  # once: no retries, no timeout here
        await deliver("https://example.com/hook")
    assert deliver.__name__ == "deliver"
    assert deliver.__doc__ == "Deliver a webhook."
    assert list(inspect.signature(deliver).parameters) == ["url", "tries"]
    assert deliver.__module__ == __name__
    assert repr(deliver) == (
        f"<TaskFunction {__name__}.{deliver.__qualname__} timeout=1.0, attempts=2,"
        f" retry_on=(ConnectionError,)>"
    )
    assert repr(render).endswith("render timeout=1.0, attempts=1>")


async def test_starlette_s_own_collection_runs_it_as_a_plain_function() -> None:
    """Handed to Starlette's (or FastAPI's) `BackgroundTasks`, a function with
    options runs as the plain function: awaited if async, never left as an
    un-awaited coroutine."""
    flaky = Flaky()
    tasks = StarletteBackgroundTasks()
    tasks.add_task(options_on(flaky, "async", timeout=1.0), "async")
    tasks.add_task(options_on(flaky, "sync", timeout=1.0), "sync")
    await tasks()
    assert flaky.calls == ["async", "sync"]


# Retries


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_listed_error_is_retried_until_an_attempt_succeeds(
    kind: str, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky(ConnectionError("refused"), TimeoutError("slow"))
    deliver = options_on(flaky, kind, attempts=3, retry_on=(ConnectionError, TimeoutError))
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, SECRET)
    after = tasks.add_task(flaky, "after")
    await tasks()
    assert handle.status == "done"
    assert handle.attempts == 3
    assert handle.error is None
    assert handle.to_dict()["attempts"] == 3
    assert flaky.calls == [SECRET] * 3 + ["after"]
    assert after.status == "done"
    mine = [s for s in sent if s.kwargs["handle"] is handle]
    assert [s.signal for s in mine] == [
        "task_started",
        "task_retrying",
        "task_started",
        "task_retrying",
        "task_started",
        "task_completed",
    ]
    retrying = [s.kwargs for s in mine if s.signal == "task_retrying"]
    assert [k["attempt"] for k in retrying] == [1, 2]
    assert [type(k["error"]) for k in retrying] == [ConnectionError, TimeoutError]
    assert all(k["wait_s"] == 0.0 for k in retrying)  # stamina's test mode
    assert all(k["func"] is deliver and k["task_id"] == handle.task_id for k in retrying)
    warnings = [r.getMessage() for r in records(caplog) if r.levelname == "WARNING"]
    assert warnings == [
        f"Background task {handle.task_id} ({handle.name}) raised ConnectionError on attempt 1;"
        f" retrying in 0.00 s",
        f"Background task {handle.task_id} ({handle.name}) raised TimeoutError on attempt 2;"
        f" retrying in 0.00 s",
    ]
    assert SECRET not in caplog.text


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_last_failure_is_reported_once(
    kind: str, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky(*(ConnectionError(f"refused {n}") for n in range(3)))
    deliver = options_on(flaky, kind, attempts=3, retry_on=ConnectionError)
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, SECRET)
    await tasks()
    assert handle.status == "failed"
    assert handle.attempts == 3
    assert str(handle.error) == "refused 2"
    assert [s.signal for s in sent].count("task_retrying") == 2  # none after the last
    (failed,) = [s for s in sent if s.signal == "task_failed"]
    assert failed.kwargs["error"] is handle.error
    errors = [r for r in records(caplog) if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [
        f"Background task {handle.task_id} ({handle.name}) failed"
    ]
    assert SECRET not in caplog.text


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_error_not_listed_is_never_retried(kind: str, sent: list[Sent]) -> None:
    flaky = Flaky(ValueError("bad payload"))
    deliver = options_on(flaky, kind, attempts=5, retry_on=ConnectionError)
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    await tasks()
    assert handle.status == "failed"
    assert isinstance(handle.error, ValueError)
    assert handle.attempts == 1
    assert [s.signal for s in sent] == ["task_started", "task_failed"]


async def test_with_stamina_deactivated_a_task_runs_once(sent: list[Sent]) -> None:
    flaky = Flaky(ConnectionError("refused"))
    deliver = options_on(flaky, "async", attempts=3, retry_on=ConnectionError)
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    stamina.set_active(False)
    try:
        await tasks()
    finally:
        stamina.set_active(True)
    assert handle.status == "failed"
    assert handle.attempts == 1
    assert "task_retrying" not in [s.signal for s in sent]


async def test_the_backoff_is_stamina_s_and_counts_against_the_timeout(
    sent: list[Sent],
) -> None:
    """Outside test mode the first backoff is at least stamina's 0.1 s; a
    shorter timeout cuts the task during that wait (no real wait in the test
    beyond the 20 ms deadline)."""
    flaky = Flaky(ConnectionError("refused"))
    deliver = options_on(flaky, "async", timeout=0.02, attempts=2, retry_on=ConnectionError)
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    with stamina.set_testing(False):
        await tasks()
    (retrying,) = [s.kwargs for s in sent if s.signal == "task_retrying"]
    assert retrying["wait_s"] == pytest.approx(0.1)
    assert handle.status == "failed"
    assert isinstance(handle.error, TimeoutError)
    assert handle.attempts == 1  # the second attempt never started


# Timeout


async def test_an_async_task_past_its_timeout_fails_with_timeout_error(
    sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    @task(timeout=0.01)
    async def hang(url: str) -> None:
        await anyio.sleep_forever()

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(hang, SECRET)
    after = tasks.add_task(Flaky(), "after")
    await tasks()
    assert handle.status == "failed"
    assert type(handle.error) is TimeoutError
    assert str(handle.error) == "the task ran past its timeout of 0.01 s (task(timeout=0.01))"
    assert handle.to_dict()["error"] == "TimeoutError"
    assert after.status == "done"
    assert [s.signal for s in sent if s.kwargs["handle"] is handle] == [
        "task_started",
        "task_failed",
    ]
    assert [r.getMessage() for r in records(caplog) if r.levelname == "ERROR"] == [
        f"Background task {handle.task_id} ({handle.name}) failed"
    ]
    assert SECRET not in caplog.text


async def test_a_sync_task_past_its_timeout_is_reported_failed_and_left_to_finish() -> None:
    release = threading.Event()
    finished = threading.Event()

    @task(timeout=0.01)
    def block(url: str) -> None:
        release.wait(10)
        finished.set()

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(block, "https://example.com/hook")
    await tasks()
    assert handle.status == "failed"
    assert isinstance(handle.error, TimeoutError)
    assert not finished.is_set()  # still running in its thread
    release.set()
    await anyio.to_thread.run_sync(finished.wait, 10)
    assert handle.status == "failed"  # its late end changes nothing


async def test_a_task_within_its_timeout_is_done() -> None:
    deliver = options_on(Flaky(), "async", timeout=math.inf)
    assert deliver.timeout is None
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(options_on(Flaky(), "sync", timeout=30), "https://example.com/hook")
    await tasks()
    assert handle.status == "done"
    assert handle.attempts == 1


# Cancellation


@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_cancellation_during_an_attempt_is_not_retried(
    timeout: float | None,  # noqa: ASYNC109  (the option's, not this test's)
    sent: list[Sent],
) -> None:
    started = anyio.Event()

    @task(timeout=timeout, attempts=5, retry_on=Exception)
    async def deliver(url: str) -> None:
        started.set()
        await anyio.sleep_forever()

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    queued = tasks.add_task(deliver, "https://example.com/other")
    async with anyio.create_task_group() as tg:
        tg.start_soon(tasks.run)
        await started.wait()
        tg.cancel_scope.cancel()
    assert handle.status == "cancelled"
    assert handle.attempts == 1
    assert queued.status == "cancelled"
    assert "task_retrying" not in [s.signal for s in sent]


# Through FastAPI, with a tracker


def test_an_endpoint_queues_a_task_with_options(anyio_backend: Literal["asyncio", "trio"]) -> None:
    flaky = Flaky(ConnectionError("refused"))
    deliver = options_on(flaky, "async", attempts=2, retry_on=ConnectionError)
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router(prefix="/tasks"))

    @app.post("/hooks")
    async def hook(url: str, tasks: BackgroundTasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(deliver, url).task_id}

    with TestClient(app, backend=anyio_backend) as client:
        task_id = client.post("/hooks", params={"url": SECRET}).json()["task_id"]
        record = client.get(f"/tasks/{task_id}").json()
    assert record["status"] == "done"
    assert record["attempts"] == 2
    assert flaky.calls == [SECRET, SECRET]


# Refused when applied


def generator(url: str) -> Iterator[str]:
    yield url


async def async_generator(url: str) -> Any:
    yield url


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"attempts": 0}, ValueError, "attempts=...) must be an int >= 1"),
        ({"attempts": 2.5}, ValueError, "got 2.5"),
        ({"attempts": True}, ValueError, "got True"),
        ({"timeout": -1}, ValueError, "timeout=...) must be a number of seconds > 0"),
        ({"timeout": 0}, ValueError, "got 0"),
        ({"timeout": math.nan}, ValueError, "got nan"),
        ({"timeout": "10"}, ValueError, "got '10'"),
        ({"timeout": False}, ValueError, "got False"),
        ({"attempts": 2, "retry_on": "ConnectionError"}, TypeError, "an Exception subclass"),
        ({"attempts": 2, "retry_on": (ConnectionError, 3)}, TypeError, "got (<class"),
        ({"attempts": 2, "retry_on": KeyboardInterrupt}, TypeError, "an Exception subclass"),
        ({"retry_on": ConnectionError}, ValueError, "needs attempts > 1"),
        ({"attempts": 3}, ValueError, "retries only the exception types in retry_on"),
    ],
)
def test_bad_options_are_refused_when_applied(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=r"^task\(") as caught:
        task(**options)
    assert message in str(caught.value)


@pytest.mark.parametrize("func", [generator, async_generator])
def test_a_generator_function_is_refused(func: Any) -> None:
    with pytest.raises(TypeError, match=r"generator function .*make it a plain 'def'"):
        task(timeout=1.0)(func)


def test_what_is_not_a_function_is_refused() -> None:
    with pytest.raises(TypeError, match="decorates a function"):
        task(timeout=1.0)(42)  # type: ignore[arg-type]
    twice = task(timeout=1.0)(print)
    with pytest.raises(TypeError, match="already has task options"):
        task(timeout=2.0)(twice)


def test_the_decorator_needs_its_parentheses() -> None:
    with pytest.raises(TypeError, match="with the parentheses"):
        task(generator)  # type: ignore[arg-type]


def test_retries_without_stamina_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "stamina", None)
    with pytest.raises(ImportError, match=r"pip install 'fastapi-bgplus\[retry\]'"):
        task(attempts=2, retry_on=ConnectionError)
    task(timeout=1.0)  # a timeout alone needs no stamina


def test_importing_the_package_does_not_import_stamina() -> None:
    run_python(
        """
        import sys, fastapi_bgplus
        fastapi_bgplus.task(timeout=1.0)(print)
        assert 'stamina' not in sys.modules and 'tenacity' not in sys.modules
        """
    )


async def test_callable_objects_and_partials_may_carry_options() -> None:
    flaky = Flaky(ConnectionError("refused"))
    deliver = task(attempts=2, retry_on=ConnectionError)(flaky)
    assert not deliver.is_async
    async_partial = task(timeout=5.0)(functools.partial(ping, flaky, "partial"))
    assert async_partial.is_async
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    other = tasks.add_task(async_partial)
    await tasks()
    assert handle.status == "done"
    assert handle.attempts == 2
    assert other.status == "done"
    assert flaky.calls == ["https://example.com/hook"] * 2 + ["partial"]


@pytest.mark.parametrize("outcome", ["raises", "returns"])
async def test_a_task_reported_lost_while_running_is_not_reported_again(
    outcome: str, sent: list[Sent]
) -> None:
    """A collection cut off while a task runs reports it lost at once (a task
    may swallow its cancellation); however that task ends later, that stands."""
    started = anyio.Event()
    release = anyio.Event()

    @task(timeout=30.0)
    async def deliver(url: str) -> None:
        started.set()
        await release.wait()
        if outcome == "raises":
            raise ConnectionError(url)

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    async with anyio.create_task_group() as tg:
        tg.start_soon(tasks.run)
        await started.wait()
        tasks.cancel("the test cut it off")
        release.set()
    assert handle.status == "cancelled"
    assert [s.signal for s in sent] == ["task_started", "task_abandoned"]
