from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from time import perf_counter
from types import FunctionType
from typing import TYPE_CHECKING, Any, ParamSpec

import anyio
import anyio.to_thread
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

from ._handle import _DONE, _PENDING, _RUNNING, TaskHandle, TaskStatus, _callable_name
from ._limiter import current_thread_limiter
from ._signals import send
from .signals import task_abandoned, task_completed, task_failed, task_started

if TYPE_CHECKING:
    from ._tracker import TaskTracker

__all__ = ["TrackedBackgroundTasks"]

P = ParamSpec("P")

logger = logging.getLogger("fastapi_bgplus")


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _check_task_callable(func: Any) -> None:
    """Refuse, with a message that says what to do, what could never run."""
    if type(func) is FunctionType:
        # The common case, decided cheaply: a function is never awaitable,
        # and its code's flags say whether it is a generator function.
        if func.__code__.co_flags & _GENERATOR_FLAGS:
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
        f"add_task() got a generator function ({_callable_name(func)}),"
        f" whose body would never run; background tasks must be plain"
        f" 'def' or 'async def' functions: wrap it in one that iterates it"
    )


class TrackedBackgroundTasks(StarletteBackgroundTasks):
    """A collection of background tasks that runs each one isolated and tracked.

    A drop-in for Starlette's and FastAPI's `BackgroundTasks`: `add_task()`
    takes the same arguments and returns a `TaskHandle`. The tasks run once,
    one after the other in the order added; one that raises is logged and
    marked failed, and the next still runs. `def` tasks run in worker threads
    under a dedicated limiter (see `current_thread_limiter()`).

    In FastAPI, annotate parameters with `fastapi_bgplus.BackgroundTasks` to
    receive the request's collection. Elsewhere, build one and hand it to a
    response: ``Response(..., background=BackgroundTasks())``.

    Parameters:
        tasks: Starlette `BackgroundTask` objects to queue, in order; each gets
            a handle of its own in `handles`.
    """

    def __init__(self, tasks: Sequence[BackgroundTask] | None = None) -> None:
        self.tasks: list[BackgroundTask] = []
        self.handles: list[TaskHandle] = []
        self.app: Any = None
        self._tracker: TaskTracker | None = None
        self._started = False
        self._cancel_reason: str | None = None
        for task in tasks or ():
            if not isinstance(task, BackgroundTask):
                raise TypeError(
                    f"BackgroundTasks(tasks=...) takes starlette BackgroundTask"
                    f" objects, got {type(task).__name__!r}; for plain functions"
                    f" use add_task(func, *args, **kwargs)"
                )
            if isinstance(task, StarletteBackgroundTasks):
                # A nested collection has no func of its own: run it whole.
                task = BackgroundTask(task)
            else:
                _check_task_callable(task.func)
            self._queue(task)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.tasks)} task(s)>"

    def add_task(  # type: ignore[override]  # returns a TaskHandle, not None
        self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle:
        """Queue `func(*args, **kwargs)` to run after the response is sent.

        Returns the task's `TaskHandle`. Raises `TypeError` for what can never
        run (a non-callable, a coroutine object, a generator function) and
        `RuntimeError` once the collection has started running; nothing is
        queued then.
        """
        if self._started:
            raise RuntimeError(
                "add_task() was called on a BackgroundTasks collection that has"
                " already started running; queue tasks before the response is"
                " sent, or build a new collection for later work"
            )
        _check_task_callable(func)
        return self._queue(BackgroundTask(func, *args, **kwargs))

    def _queue(self, task: BackgroundTask) -> TaskHandle:
        handle = TaskHandle(_callable_name(task.func))
        self.tasks.append(task)
        self.handles.append(handle)
        if self._tracker is not None:
            self._tracker._track(self, handle)
        return handle

    async def run(self) -> None:
        """Run the queued tasks, one after the other; a collection runs once.

        Raises `RuntimeError` if it has already run. Cancellation is not
        swallowed: the running task and those queued behind it end
        ``cancelled``, each with a `task_abandoned` signal, and the
        cancellation propagates.
        """
        if self._started:
            raise RuntimeError(
                "This BackgroundTasks collection has already run, and a"
                " collection runs once; build a new BackgroundTasks() for more work"
            )
        self._started = True
        if self._tracker is None:
            await self._run_tasks()
        else:
            with self._tracker._cancel_scope(self):
                await self._run_tasks()

    # `await tasks()` is `await tasks.run()`, without a coroutine in between.
    __call__ = run

    async def _run_tasks(self) -> None:
        sender = self.app
        tasks = self.tasks
        tracker = self._tracker
        try:
            # Not zip(): with strict=True, which linters ask for, it costs as
            # much as a no-op task on Python 3.11.
            for index, handle in enumerate(self.handles):
                task = tasks[index]
                if handle.status is not _PENDING:
                    continue  # abandoned before the collection ran
                # Started here, not in a TaskHandle method: this loop is the hot path.
                handle.status = _RUNNING
                handle._started_mono = perf_counter()
                try:
                    if task_started.receivers:
                        await send(
                            task_started,
                            sender,
                            handle=handle,
                            task_id=handle.task_id,
                            func=task.func,
                        )
                    if task.is_async:
                        await task.func(*task.args, **task.kwargs)
                    else:
                        await _run_sync(task)
                except Exception as exc:
                    if handle.status is not _RUNNING:
                        continue  # reported lost by the tracker while it ran
                    handle._finish(TaskStatus.FAILED, exc)
                    logger.error(
                        "Background task %s (%s) failed",
                        handle.task_id,
                        handle.name,
                        exc_info=exc,
                    )
                    if tracker is not None:
                        tracker._settle(handle)
                    if task_failed.receivers:
                        await send(
                            task_failed,
                            sender,
                            handle=handle,
                            task_id=handle.task_id,
                            func=task.func,
                            duration_s=handle.duration_s,
                            error=exc,
                        )
                else:
                    if handle.status is not _RUNNING:
                        continue  # reported lost by the tracker while it ran
                    handle._finish(_DONE)
                    if tracker is not None:
                        tracker._settle(handle)
                    if task_completed.receivers:
                        await send(
                            task_completed,
                            sender,
                            handle=handle,
                            task_id=handle.task_id,
                            func=task.func,
                            duration_s=handle.duration_s,
                        )
        except BaseException:
            # Cancelled in a task, or in a receiver awaited between tasks:
            # every task that has not ended is reported lost (those before it
            # have all ended), so that none ends without a trace.
            cause = self._cancel_reason or (
                "the request's background work was cancelled (by the server, for"
                " instance at shutdown past --timeout-graceful-shutdown, or by the caller)"
            )
            with anyio.CancelScope(shield=True):
                await self._abandon(cause)
            raise

    async def _abandon(self, cause: str) -> None:
        """End every unfinished task as cancelled, loudly."""
        for task, handle in zip(self.tasks, self.handles, strict=True):
            if handle.finished:
                continue
            if handle.status is TaskStatus.RUNNING:
                reason = f"{cause}; it was cut off while running"
            else:
                reason = f"{cause}; it never started"
            handle._finish(TaskStatus.CANCELLED)
            logger.warning(
                "Background task %s (%s) abandoned: %s",
                handle.task_id,
                handle.name,
                reason,
            )
            self._settle(handle)
            if task_abandoned.receivers:
                await send(
                    task_abandoned,
                    self.app,
                    handle=handle,
                    task_id=handle.task_id,
                    func=task.func,
                    reason=reason,
                )

    def _settle(self, handle: TaskHandle) -> None:
        if self._tracker is not None:
            self._tracker._settle(handle)


async def _run_sync(task: BackgroundTask) -> None:
    def call() -> tuple[Any]:
        # Boxed, because trio fails a thread that returns a coroutine, and
        # `add_task(lambda: send(x))` must work the same on both backends.
        return (task.func(*task.args, **task.kwargs),)

    # abandon_on_cancel: a thread cannot be interrupted, and waiting for it
    # would stall shutdown; the task is reported cut off, the thread finishes
    # on its own.
    (result,) = await anyio.to_thread.run_sync(
        call, limiter=current_thread_limiter(), abandon_on_cancel=True
    )
    if inspect.isawaitable(result):
        # `add_task(lambda: send(x))`: the work is in the awaitable.
        await result
