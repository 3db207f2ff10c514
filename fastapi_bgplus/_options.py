"""Task options: ``@task(timeout=..., attempts=..., retry_on=...)``.

The decorator returns a `TaskFunction`, which calls like the plain function
and is the runner `add_task` uses for it (`TaskFunction.run_task`): in its
turn, under a deadline, retried by stamina. The run loop knows nothing of
options.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

import anyio
from anyio.lowlevel import RunVar
from starlette.background import BackgroundTask

from ._handle import TaskHandle, TaskStatus, callable_name
from ._report import Reporter
from ._run import call

__all__ = ["TaskFunction", "task"]

P = ParamSpec("P")
R = TypeVar("R")

ExceptionTypes = type[Exception] | tuple[type[Exception], ...]


def task(
    _func: None = None,
    /,
    *,
    timeout: float | None = None,
    attempts: int = 1,
    retry_on: ExceptionTypes = (),
    concurrency: int | None = None,
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Give a task function options that `add_task` honours.

    ::

        @task(timeout=10.0, attempts=3, retry_on=(httpx.TransportError,))
        async def deliver_webhook(url: str) -> None: ...

        tasks.add_task(deliver_webhook, url)  # the options travel with the function

    Parameters:
        timeout: Seconds the task may run, all attempts and the waits between
            them included; past it the task ends ``failed`` with a
            `TimeoutError`. A `def` task's thread cannot be interrupted: it is
            reported failed at the deadline and left to finish. `None` or
            `math.inf`: no limit.
        attempts: How many times the task may run in all (1: no retries). A
            retry happens only for the exception types in `retry_on`, after an
            exponential backoff with jitter (stamina's: 0.1 s, doubling, at
            most 5 s, plus up to 1 s of jitter). Needs the ``retry`` extra:
            ``pip install "fastapi-bgplus[retry]"``.
        retry_on: An `Exception` subclass, or a tuple of them, to retry on.
        concurrency: At most this many runs of the function at once in the
            process (per event loop), across requests and collections; the
            others wait ``pending``, first come first served, and their
            `timeout` counts from their start. `None`: no limit.

    Calling the decorated function directly calls the plain function, with no
    options. Raises `TypeError` or `ValueError` when applied, for an option
    out of its range or a function that cannot be a task, saying what is valid.
    """
    if _func is not None:
        raise TypeError(
            "task() takes only keyword options; write @task(timeout=10.0, attempts=3,"
            " retry_on=(ConnectionError,)), with the parentheses"
        )
    timeout = _checked_timeout(timeout)
    retry_types = _checked_retry_on(retry_on)
    _check_attempts(attempts, retry_types)
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise ValueError(
            f"task(concurrency=...) must be an int >= 1 (runs at once), or None for no"
            f" limit; got {concurrency!r}"
        )

    def decorate(func: Callable[P, R]) -> TaskFunction[P, R]:
        kind = _AsyncTaskFunction if _check_function(func) else TaskFunction
        return kind(
            func,
            timeout=timeout,
            attempts=attempts,
            retry_on=retry_types,
            concurrency=concurrency,
        )

    return decorate


class TaskFunction(Generic[P, R]):
    """A task function with options (see `task`); calling it calls the function."""

    __wrapped__: Callable[P, R]
    __name__: str  # copied from the function, as functools.wraps does
    __qualname__: str
    is_async = False

    def __init__(
        self,
        func: Callable[P, R],
        *,
        timeout: float | None,
        attempts: int,
        retry_on: tuple[type[Exception], ...],
        concurrency: int | None = None,
    ) -> None:
        functools.update_wrapper(self, func)
        self.timeout = timeout
        self.attempts = attempts
        self.retry_on = retry_on
        self.concurrency = concurrency
        # One semaphore per event loop: anyio's primitives belong to one.
        self._turns: RunVar[anyio.Semaphore] = RunVar(f"fastapi_bgplus.turns.{id(self)}")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        options = f"timeout={self.timeout!r}, attempts={self.attempts!r}"
        if self.retry_on:
            names = ", ".join(error.__name__ for error in self.retry_on)
            options += f", retry_on=({names},)"
        if self.concurrency is not None:
            options += f", concurrency={self.concurrency!r}"
        return f"<TaskFunction {callable_name(self.__wrapped__)} {options}>"

    async def run_task(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        """Run it as a task (the `TaskRunner` `add_task` uses): in its turn,
        under its deadline, with its retries, reporting each transition."""
        if self.concurrency is None:
            await self._run(report, handle, task)
            return
        try:
            turns = self._turns.get()
        except LookupError:
            turns = anyio.Semaphore(self.concurrency)
            self._turns.set(turns)
        async with turns:
            await self._run(report, handle, task)

    async def _run(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        try:
            if self.timeout is None:
                await self._attempts(report, handle, task)
            else:
                with anyio.move_on_after(self.timeout) as deadline:
                    await self._attempts(report, handle, task)
                if deadline.cancelled_caught:
                    raise TimeoutError(
                        f"the task ran past its timeout of {self.timeout} s"
                        f" (task(timeout={self.timeout!r}))"
                    )
        except Exception as exc:
            if handle.status is TaskStatus.RUNNING:  # not cancelled meanwhile
                await report.failed(handle, self, exc)
        else:
            if handle.status is TaskStatus.RUNNING:
                await report.completed(handle, self)

    async def _attempts(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        if self.attempts == 1:
            await self._attempt(report, handle, task)
            return
        import stamina

        # Attempts, backoff and jitter are stamina's. A hand-made loop would
        # miss its test mode (`stamina.set_testing`) and its switch
        # (`stamina.set_active`); its own timeout is off, ours is the deadline.
        async for attempt in stamina.retry_context(
            on=self.retry_on, attempts=self.attempts, timeout=None
        ):
            with attempt:
                try:
                    await self._attempt(report, handle, task)
                except self.retry_on as exc:
                    if attempt.num < self.attempts and stamina.is_active():
                        # Before stamina's wait, which follows once the error
                        # leaves this block; `next_wait` is that wait less its
                        # random jitter.
                        await report.retrying(handle, self, exc, attempt.next_wait)
                    raise

    async def _attempt(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        await report.started(handle, self)
        await call(handle, task)


async def _call_async(self: TaskFunction[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await self.__wrapped__(*args, **kwargs)


# For an `async def` function, a subclass with an `async def __call__`: whoever
# asks whether it is async (Starlette's `BackgroundTask`, FastAPI's own
# `BackgroundTasks` when handed one) then awaits it rather than sending it to
# a thread, where it would return a coroutine that nobody awaits.
_AsyncTaskFunction: type[TaskFunction[Any, Any]] = type(
    "AsyncTaskFunction",
    (TaskFunction,),
    {"__call__": _call_async, "is_async": True, "__module__": __name__},
)


def _checked_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or math.isnan(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"task(timeout=...) must be a number of seconds > 0, or None (or math.inf)"
            f" for no limit; got {timeout!r}"
        )
    return None if math.isinf(timeout) else float(timeout)


def _checked_retry_on(retry_on: object) -> tuple[type[Exception], ...]:
    types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    for error in types:
        if not (isinstance(error, type) and issubclass(error, Exception)):
            raise TypeError(
                f"task(retry_on=...) takes an Exception subclass or a tuple of them,"
                f" such as retry_on=(ConnectionError, TimeoutError); got {retry_on!r}"
            )
    return types


def _check_attempts(attempts: object, retry_on: tuple[type[Exception], ...]) -> None:
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(
            f"task(attempts=...) must be an int >= 1 (the runs in all; 1: no retries),"
            f" got {attempts!r}"
        )
    if attempts == 1 and retry_on:
        raise ValueError(
            "task(retry_on=...) needs attempts > 1 to retry anything; pass attempts=3, say, as well"
        )
    if attempts > 1:
        if not retry_on:
            raise ValueError(
                f"task(attempts={attempts}) retries only the exception types in"
                f" retry_on; pass them, e.g. retry_on=(ConnectionError,)"
            )
        try:
            import stamina  # noqa: F401
        except ImportError:
            raise ImportError(
                f"task(attempts={attempts}) retries through stamina, which is not"
                f" installed; install the extra: pip install 'fastapi-bgplus[retry]'"
            ) from None


def _check_function(func: object) -> bool:
    """Whether `func` is async; refuse what cannot be a task."""
    if isinstance(func, TaskFunction):
        raise TypeError(
            f"{callable_name(func.__wrapped__)} already has task options; pass them"
            f" all to one @task(...)"
        )
    if not callable(func):
        raise TypeError(
            f"@task(...) decorates a function ('def' or 'async def'), got {type(func).__name__!r}"
        )
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = getattr(target, "__call__", target)  # noqa: B004
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"@task(...) got a generator function ({callable_name(func)}),"
            f" whose body would never run as a task; make it a plain 'def' or"
            f" 'async def' function"
        )
    return inspect.iscoroutinefunction(target)
