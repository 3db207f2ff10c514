"""Runners: how one task runs, reporting each transition."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Protocol

import anyio
import anyio.to_thread
from starlette.background import BackgroundTask

from ._handle import TaskHandle, TaskStatus, callable_name, running_task
from ._limiter import current_thread_limiter
from ._report import Reporter

__all__ = ["TaskRunner", "call", "run_task"]


class TaskRunner(Protocol):
    """Runs one task through `report`: the plain call (`run_task`), a task
    with options (`fastapi_bgplus.task`), a taskiq task sent to its broker."""

    async def __call__(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        """Run `task`, whose handle is `handle`, reporting each transition;
        raise only what is not the task's own failure (cancellation)."""


async def run_task(report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
    """The plain runner: one attempt, isolated."""
    func = task.func
    try:
        await report.started(handle, func)
        await call(handle, task)
    except Exception as exc:
        if handle.status is TaskStatus.RUNNING:  # not cancelled meanwhile
            await report.failed(handle, func, exc)
    else:
        if handle.status is TaskStatus.RUNNING:
            await report.completed(handle, func)


async def call(handle: TaskHandle, task: BackgroundTask) -> None:
    """Call a task the plain way, awaited or in a worker thread, with
    `current_task()` answering its handle."""
    token = running_task.set(handle)
    try:
        if task.is_async:
            await _settle(task, await task.func(*task.args, **task.kwargs))
        else:
            await _run_sync(task)
    finally:
        running_task.reset(token)


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
    await _settle(task, result)


async def _settle(task: BackgroundTask, result: Any) -> None:
    """The work left in what a task's call returned: an awaitable is awaited
    (`add_task(lambda: send(x))`, or an ``async def`` wrapper that forgot an
    ``await``), and a generator (whose body never ran) fails the task.
    Anything else is a plain return value."""
    if result is None:  # the common case, decided first
        return
    if inspect.isawaitable(result) and not isinstance(result, asyncio.Future):
        # An `asyncio.Task` or future is work already running on its own: left alone.
        await result
    elif inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise TypeError(
            f"background task {callable_name(task.func)} returned a generator object,"
            f" so its body never ran; a generator runs only when iterated: queue a"
            f" plain 'def' or 'async def' function that iterates it"
        )
