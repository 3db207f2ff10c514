from __future__ import annotations

import enum
import functools
import math
import os
import time
from datetime import datetime, timezone
from types import FunctionType
from typing import Any

import anyio

__all__ = [
    "TaskHandle",
    "TaskStatus",
    "finished_mono",
    "handed_off",
]


class TaskStatus(str, enum.Enum):
    """Where a background task is in its life.

    A `str` enum, so ``handle.status == "done"`` holds for a finished task.
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    """Its process stopped without reporting an end; it may or may not have run.
    Only a task store answers it, for a task of another process (see `TaskTracker`)."""

    def __str__(self) -> str:
        return self.value


# The members, bound once: reading one off the class costs about 100 ns before
# Python 3.12, and every task reads several on its way through.
PENDING = TaskStatus.PENDING
RUNNING = TaskStatus.RUNNING
DONE = TaskStatus.DONE
FINISHED = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.LOST})


def callable_name(func: Any) -> str:
    if type(func) is FunctionType and func.__module__:  # the common case, quickly
        return f"{func.__module__}.{func.__qualname__}"
    while isinstance(func, functools.partial):
        func = func.func
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if qualname is None:  # an instance whose __call__ does the work
        qualname = type(func).__qualname__
        module = type(func).__module__
    return f"{module}.{qualname}" if module else qualname


_monotonic = time.perf_counter  # the handles' clock

# The wall clock's time at the monotonic clock's zero: a handle's timestamps
# are monotonic readings plus this, read again when over a second old, so
# that a handle costs one clock reading, not two, and a step of the system
# clock shows within a second. (Both clocks slew alike under NTP.)
_EPOCH_MAX_AGE = 1.0
_epoch = 0.0
_epoch_due = -math.inf  # on the monotonic clock: when to read `_epoch` again


def _read_epoch(now: float) -> None:
    global _epoch, _epoch_due
    _epoch = time.time() - now
    _epoch_due = now + _EPOCH_MAX_AGE


_ID_BATCH = 64
_ids: list[str] = []  # drawn ahead, in bulk: one system call per batch


def _new_task_id() -> str:
    """32 hex digits, 128 bits from the OS's cryptographic source.

    Ids are unguessable, so the status route needs no further access control
    to stay private. `list.pop()` is atomic, so threads (sync endpoints queue
    tasks too) never share an id.
    """
    while True:
        try:
            return _ids.pop()
        except IndexError:
            # One id per 16 bytes: hex() puts a space between them.
            _ids.extend(os.urandom(16 * _ID_BATCH).hex(" ", 16).split())


# A forked child must not hand out the ids its parent drew ahead. (Forking is
# POSIX only; elsewhere there is nothing to guard against.)
if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_ids.clear)


class TaskHandle:
    """The id, status and timings of one background task.

    Returned by `add_task()`. Handles never hold the task's arguments, so they
    are safe to keep, log and serialise.
    """

    # Its state (`status`, `error`, `attempts`, the clocks, the event `wait()`
    # waits on, `_handed_off`) changes only at a transition, and transitions
    # are made in one place: `_lifecycle.Reporter`, which writes these slots
    # itself (a call less per transition: per task, that is measurable).

    __slots__ = (
        "_created_mono",
        "_epoch",
        "_finished_event",
        "_finished_mono",
        "_handed_off",  # set only once sent away: never read on the hot path
        "_module",
        "_name",
        "_started_mono",
        "attempts",
        "error",
        "status",
        "task_id",
    )

    _handed_off: bool  # unset until `Reporter.handed_off`: nothing to pay per task

    def __init__(self, name: str, module: str | None = None) -> None:
        try:
            self.task_id: str = _ids.pop()  # `_new_task_id()`, without a call
        except IndexError:
            self.task_id = _new_task_id()
        # With `module`, `name` is a qualname, joined to it when `name` is read:
        # a string built per task costs ~60 ns, and most names are never read.
        self._name = name
        self._module = module
        self.status: TaskStatus = PENDING
        self.error: BaseException | None = None
        self.attempts: int = 0
        # Timestamps are monotonic readings, made wall-clock time by the
        # clocks' difference as of this handle's creation (see `_epoch`).
        self._created_mono = mono = _monotonic()
        if mono > _epoch_due:
            _read_epoch(mono)
        self._epoch = _epoch
        self._started_mono: float | None = None
        self._finished_mono: float | None = None
        self._finished_event: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id[:6]}… {self.status.value} {self.name}>"

    @property
    def name(self) -> str:
        """``module.qualname`` of the task's callable (behind `functools.partial`),
        or the name its queue gives it (taskiq)."""
        module = self._module
        # Joined at every read, never stored: a handle may be read from threads.
        return f"{module}.{self._name}" if module else self._name

    @name.setter
    def name(self, name: str) -> None:
        self._name = name
        self._module = None

    def _wall(self, mono: float | None) -> datetime | None:
        if mono is None:
            return None
        return datetime.fromtimestamp(self._epoch + mono, timezone.utc)

    @property
    def created_at(self) -> datetime:
        """When `add_task()` was called (timezone-aware UTC)."""
        return datetime.fromtimestamp(self._epoch + self._created_mono, timezone.utc)

    @property
    def started_at(self) -> datetime | None:
        """When the task started running, or `None` if it never did."""
        return self._wall(self._started_mono)

    @property
    def finished_at(self) -> datetime | None:
        """When the task reached its end state, or `None` while it has not."""
        return self._wall(self._finished_mono)

    @property
    def duration_s(self) -> float | None:
        """Run time in seconds, from a monotonic clock; `None` unless it ran and ended."""
        if self._started_mono is None or self._finished_mono is None:
            return None
        return self._finished_mono - self._started_mono

    @property
    def finished(self) -> bool:
        """Whether the task has reached an end state: done, failed, cancelled (or lost)."""
        return self.status in FINISHED

    async def wait(self) -> None:
        """Return once the task has reached an end state, whichever it is.

        Raises `RuntimeError` for a task handed to a queue (a taskiq task,
        once sent): it ends in a worker process, which this one never hears
        from; its status is in the task store (`TaskTracker.lookup`).
        """
        if self.finished:
            return
        if not handed_off(self):
            if self._finished_event is None:
                self._finished_event = anyio.Event()
            await self._finished_event.wait()  # set when it ends, or is handed off
            if self.finished:
                return
        raise RuntimeError(
            f"Background task {self.task_id} ({self.name}) was handed to a queue (taskiq)"
            f" and ends in a worker process, which this one never hears from; ask the"
            f" task store for its status: await tracker.lookup(task_id)"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: no arguments, no exception message."""
        started_at = self.started_at
        finished_at = self.finished_at
        return {
            "task_id": self.task_id,
            "name": self.name,
            "status": self.status.value,
            "created_at": self.created_at.isoformat(),
            "started_at": started_at.isoformat() if started_at else None,
            "finished_at": finished_at.isoformat() if finished_at else None,
            "duration_s": self.duration_s,
            "error": type(self.error).__name__ if self.error is not None else None,
            "attempts": self.attempts,
        }


# Read by the runners and the tracker; written by `_lifecycle.Reporter` only.


def handed_off(handle: TaskHandle) -> bool:
    """Whether the task was sent out of this process (`Reporter.handed_off`)."""
    return getattr(handle, "_handed_off", False)


def finished_mono(handle: TaskHandle) -> float | None:
    """When it finished, on `time.perf_counter()`'s clock (for expiry)."""
    return handle._finished_mono
