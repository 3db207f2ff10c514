"""The least tracked collection: a floor for the targets, not a design.

`LeastTracked` does per task the least the contract asks of a tracked
collection, written inline, with no call it can spare: an id from the OS's
random source (drawn 64 at a time, as ours), a record with a status and its
timings (one wall-clock reading at creation, monotonic readings after), an
index by id while the task is unfinished and a place in a bounded history
after, the run's host recorded so that a drain could cut it off, each task
isolated from the next, and a check for receivers before each signal it would
send. It leaves out what a real collection needs besides: the binding to the
app's tracker, the tracing check, the check for `yield` dependencies (its
provider pushes the collection's exit at once), counts, logging, the drain
itself and every path but the plain async task.

`per_request.py` serves it as ``/least`` and in the in-process breakdown;
`per_task.py` runs it as a floor of the tracker-bound row.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import HTTPConnection

from fastapi_bgplus import DEFAULT_HISTORY_SIZE
from fastapi_bgplus.signals import task_completed, task_started

_wall = time.time
_monotonic = time.perf_counter
_new = object.__new__


class Record:
    """What a status lookup answers: id, name, status, timings."""

    __slots__ = ("created", "created_wall", "finished", "name", "started", "status", "task_id")

    def __init__(self, task_id: str, name: str) -> None:
        self.task_id = task_id
        self.name = name
        self.status = "pending"
        self.created_wall = _wall()
        self.created = _monotonic()
        self.started: float | None = None
        self.finished: float | None = None


# The tracker's, shared by every collection: module globals, the cheapest to reach.
_ids: list[str] = []
_live: dict[str, Record] = {}
_history: deque[Record] = deque(maxlen=DEFAULT_HISTORY_SIZE)
_loop: asyncio.AbstractEventLoop | None = None  # on asyncio: the one the runs are on


def on_asyncio(loop: asyncio.AbstractEventLoop) -> None:
    """Record the host task on `loop` (asyncio); trio gets a cancel scope."""
    global _loop
    _loop = loop


class LeastTracked(StarletteBackgroundTasks):
    """See the module's docstring. Async tasks only."""

    def __init__(self) -> None:
        self.tasks: list[BackgroundTask] = []
        self.records: list[Record] = []
        self.host: Any = None

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Record:  # type: ignore[override]
        task = _new(BackgroundTask)
        task.func = func
        task.args = args
        task.kwargs = kwargs
        task.is_async = True
        if not _ids:
            _ids.extend(os.urandom(16 * 64).hex(" ", 16).split())
        record = Record(_ids.pop(), f"{func.__module__}.{func.__qualname__}")
        self.tasks.append(task)
        self.records.append(record)
        _live[record.task_id] = record
        return record

    async def __aexit__(self, exc_type: Any = None, exc: Any = None, tb: Any = None) -> None:
        """Run the tasks: as the request's exit, or called (``await tasks()``)."""
        loop = _loop
        if loop is None and self.host is None:
            import trio  # the drain's hook on trio: a cancel scope around the run

            with trio.CancelScope() as self.host:
                await self.__aexit__()  # again, inside the scope
            return
        if loop is not None:
            self.host = asyncio.current_task(loop)
        live = _live
        history = _history
        # Equal lengths by construction; strict=True costs a no-op task on Python 3.11.
        for task, record in zip(self.tasks, self.records, strict=False):
            record.status = "running"
            record.started = _monotonic()
            if task_started.receivers:
                raise NotImplementedError("a floor: it sends no signal")
            try:
                await task.func(*task.args, **task.kwargs)
            except Exception:
                record.status = "failed"
            else:
                record.status = "done"
            record.finished = _monotonic()
            if task_completed.receivers:
                raise NotImplementedError("a floor: it sends no signal")
            del live[record.task_id]
            history.append(record)

    __call__ = __aexit__


async def least_provider(connection: HTTPConnection) -> LeastTracked:
    """The shipped provider's mechanism around `LeastTracked`, without its
    checks: the collection's exit goes on the request's exit stack at once."""
    if _loop is None:
        on_asyncio(asyncio.get_running_loop())  # the server's one loop
    tasks = LeastTracked()
    connection.scope["fastapi_inner_astack"].push_async_exit(tasks)
    return tasks
