"""What a task is, seen from outside: its status, its handle, its name."""

from __future__ import annotations

import enum
import functools
import inspect
import os
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime, timezone
from types import FunctionType
from typing import Any, Protocol

import anyio

__all__ = [
    "FINISHED",
    "TaskHandle",
    "TaskStatus",
    "callable_name",
    "check_callable",
    "current_task",
    "new_task_id",
    "queueing",
    "running_task",
]


class TaskStatus(str, enum.Enum):
    """Where a background task is in its life.

    A `str` enum, so ``handle.status == "done"`` holds for a finished task.
    """

    PENDING = "pending"
    """Queued; it has not started (it may be waiting for its turn)."""
    RUNNING = "running"
    """Running now (an attempt of it, for a task with ``attempts=``)."""
    DONE = "done"
    """It returned."""
    FAILED = "failed"
    """It raised (``handle.error``), or ran past its timeout."""
    CANCELLED = "cancelled"
    """It will never run or finish: its request failed, it was cancelled, or
    it was cut off at shutdown."""
    LOST = "lost"
    """Its process stopped without reporting an end; it may or may not have run.
    Only a task store answers it, for a task of another process (see `TaskTracker`)."""

    def __str__(self) -> str:
        return self.value


FINISHED = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.LOST})
"""The end states."""


def new_task_id() -> str:
    """32 lowercase hex digits: 128 bits from the OS's cryptographic source.

    Ids are unguessable, so the status route needs no further access control
    to keep one task's status from another client."""
    return os.urandom(16).hex()


def callable_name(func: Any) -> str:
    """``module.qualname`` of a task's callable, behind `functools.partial`;
    for an instance whose ``__call__`` does the work, its class's."""
    while isinstance(func, functools.partial):
        func = func.func
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if qualname is None:
        module = type(func).__module__
        qualname = type(func).__qualname__
    return f"{module}.{qualname}" if module else qualname


def check_callable(func: Any) -> None:
    """Refuse, with a `TypeError` that says what to do, what could never run
    as a task: a non-callable, an awaitable (a coroutine object), a
    generator function."""
    if isinstance(func, FunctionType):  # the common case, decided first
        if func.__code__.co_flags & (inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR):
            raise _generator_function_error(func)
        return
    if inspect.isawaitable(func):
        name = getattr(func, "__qualname__", type(func).__qualname__)
        kind = "an awaitable"
        if inspect.iscoroutine(func):
            # Never awaited now; closing it spares the user a second,
            # confusing "coroutine was never awaited" warning.
            func.close()
            kind = "a coroutine object"  # the words of Python's own warning
        raise TypeError(
            f"add_task() got {kind} ({name}(...)) instead of a function;"
            f" pass the function and its arguments instead:"
            f" add_task({name}, *args, **kwargs)"
        )
    if not callable(func):
        raise TypeError(
            f"add_task() expects a function or other callable, got"
            f" {type(func).__name__!r}; pass the function and its arguments:"
            f" add_task(send_email, address)"
        )
    target = func
    while isinstance(target, functools.partial):
        target = target.func
    # An instance runs its __call__; a class only builds an instance.
    if not (inspect.isfunction(target) or inspect.ismethod(target) or isinstance(target, type)):
        target = getattr(target, "__call__", target)  # noqa: B004
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        raise _generator_function_error(func)


def _generator_function_error(func: Any) -> TypeError:
    return TypeError(
        f"add_task() got a generator function ({callable_name(func)}),"
        f" whose body would never run; background tasks must be plain"
        f" 'def' or 'async def' functions: wrap it in one that iterates it"
    )


class _Queueing(Protocol):
    """A request's collection while its endpoint runs (see `queueing`)."""

    @property
    def started(self) -> bool: ...

    @property
    def handles(self) -> list[TaskHandle]: ...


queueing: ContextVar[_Queueing | None] = ContextVar("fastapi_bgplus.queueing", default=None)
"""The collection of the request running in this context, set by the FastAPI
provider: a task of it that has not started cannot finish before the
response, so `TaskHandle.wait()` there would never return."""

running_task: ContextVar[TaskHandle | None] = ContextVar("fastapi_bgplus.task", default=None)
"""The handle of the task running in this context (see `current_task`)."""


def current_task() -> TaskHandle | None:
    """The `TaskHandle` of the background task running now, or `None` outside one.

    Works in ``async def`` tasks and in ``def`` tasks (their worker thread
    gets a copy of the context), and in whatever they call: a log filter
    (`TaskContextFilter`), an HTTP client's hooks."""
    return running_task.get()


class TaskHandle:
    """The id, status and timings of one background task.

    Returned by `add_task()`. Handles never hold the task's arguments, so they
    are safe to keep, log and serialise. Its state changes only when the task
    moves on (the package's runners do that); read it, or `await wait()`.

    Attributes:
        task_id: 32 lowercase hex characters, unique, unguessable.
        name: ``module.qualname`` of the task's callable (behind
            `functools.partial`), or the name its queue gives it (taskiq).
        status: A `TaskStatus`: ``pending``, ``running``, then ``done`` or
            ``failed``; or ``cancelled``.
        error: The exception of a failed task, else `None`.
        attempts: How many times it has started (more than 1 only with
            ``@task(attempts=...)``).
    """

    # The wall clock is read once, at creation; later times are that plus the
    # monotonic clock's progress, so that they stay in order and agree with
    # `duration_s` whatever the system clock does. Shown as datetimes when read.
    __slots__ = (
        "_created",
        "_created_clock",
        "_ended",
        "_finished_clock",
        "_handed_off",
        "_started_clock",
        "attempts",
        "error",
        "name",
        "status",
        "task_id",
    )

    def __init__(self, name: str, task_id: str | None = None) -> None:
        self.task_id: str = task_id or new_task_id()
        self.name: str = name
        self.status: TaskStatus = TaskStatus.PENDING
        self.error: BaseException | None = None
        self.attempts: int = 0
        self._created = time.time()
        self._created_clock = time.monotonic()
        self._started_clock: float | None = None
        self._finished_clock: float | None = None
        self._handed_off: Callable[[], Any] | None = None
        self._ended: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id[:6]}… {self.status.value} {self.name}>"

    def _wall(self, clock: float | None) -> datetime | None:
        if clock is None:
            return None
        return datetime.fromtimestamp(self._created + clock - self._created_clock, timezone.utc)

    @property
    def created_at(self) -> datetime:
        """When `add_task()` was called (timezone-aware UTC)."""
        return datetime.fromtimestamp(self._created, timezone.utc)

    @property
    def started_at(self) -> datetime | None:
        """When it first started (timezone-aware UTC), or `None`."""
        return self._wall(self._started_clock)

    @property
    def finished_at(self) -> datetime | None:
        """When it reached its end state (timezone-aware UTC), or `None`."""
        return self._wall(self._finished_clock)

    @property
    def duration_s(self) -> float | None:
        """Run time in seconds, from a monotonic clock; `None` unless it ran and ended."""
        if self._started_clock is None or self._finished_clock is None:
            return None
        return self._finished_clock - self._started_clock

    @property
    def finished(self) -> bool:
        """Whether the task has reached an end state: done, failed, cancelled (or lost)."""
        return self.status in FINISHED

    @property
    def handed_off(self) -> bool:
        """Whether the task was sent out of this process (to a taskiq broker):
        it ends in a worker, which reports to the task store."""
        return self._handed_off is not None

    @property
    def finished_clock(self) -> float | None:
        """When it ended, on `time.monotonic()`'s clock (for expiry)."""
        return self._finished_clock

    # Transitions: made by the package's Reporter only.

    def _start(self) -> None:
        self.status = TaskStatus.RUNNING
        self.attempts += 1
        if self._started_clock is None:
            self._started_clock = time.monotonic()

    def _finish(self, status: TaskStatus, error: BaseException | None = None) -> None:
        self.status = status
        self.error = error
        self._finished_clock = time.monotonic()
        if self._ended is not None:
            self._ended.set()

    def _hand_off(self, wait: Callable[[], Any]) -> None:
        """Sent to a queue: `wait` is what `wait()` awaits from now on."""
        self._handed_off = wait
        if self._ended is not None:
            self._ended.set()  # a `wait()` already waiting follows it there

    async def wait(self) -> None:
        """Return once the task has reached an end state, whichever it is.

        Raises `RuntimeError` at once where it could never return: awaited in
        the request that queued the task, before the response (the task runs
        after it). For a task handed to taskiq, it polls the task store (see
        `TaskTracker.lookup`), or raises if the tracker has none.
        """
        if self.finished:
            return
        collection = queueing.get()
        if collection is not None and not collection.started and self in collection.handles:
            raise RuntimeError(
                f"await handle.wait() for background task {self.task_id} ({self.name})"
                f" in the request that queued it would never return: its tasks run"
                f" after the response is sent. Return the task id to the client and"
                f" look the task up later (TaskTracker.router(), tracker.lookup())"
            )
        if self._handed_off is None:
            if self._ended is None:
                self._ended = anyio.Event()
            await self._ended.wait()  # set when it ends, or is handed off
        if self._handed_off is not None and not self.finished:
            await self._handed_off()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: no arguments, no exception message."""
        return {
            "task_id": self.task_id,
            "name": self.name,
            "status": self.status.value,
            "created_at": self.created_at.isoformat(),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_s": self.duration_s,
            "error": type(self.error).__name__ if self.error is not None else None,
            "attempts": self.attempts,
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
