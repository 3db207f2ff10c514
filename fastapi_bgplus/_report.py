"""The one place a task's fate is reported.

Every runner (the run loop, `@task` options, the taskiq sender and
middleware) calls a `Reporter` at each transition. The Reporter moves the
handle on, tells each observer in one plain loop (the tracker's books, the
store writer, spans, metrics, the user's own), writes the log line and
sends the blinker signal, in that order.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from blinker import Signal

from ._backend import Loop, current_library
from ._handle import TaskHandle, TaskStatus
from .signals import task_abandoned, task_completed, task_failed, task_retrying, task_started

__all__ = ["DEFAULT_GRACE", "NO_HOOKS", "Cancellable", "Hooks", "Reporter", "TaskObserver", "send"]

logger = logging.getLogger("fastapi_bgplus")

DEFAULT_GRACE = 5.0
"""Seconds a cut-off run may take to report its tasks lost (its async
`task_abandoned` receivers included) before it is left behind."""


class Cancellable(Protocol):
    """What runs tasks and can be cut off: a request's collection."""

    def cancel(self, reason: str) -> None:
        """End every unfinished task as cancelled, with `reason` (a sentence)."""

    def cancel_task(self, handle: TaskHandle, reason: str) -> None:
        """End one unfinished task as cancelled, with `reason`; the others go on."""


class TaskObserver:
    """Hears every transition of the tracked tasks: subclass it and override
    the hooks you need (the others do nothing).

    Pass instances to ``TaskTracker(observers=[...])``. The hooks are called
    on the event loop, in the order of the transitions, with the task's
    `TaskHandle` (its ``status``, ``attempts`` and timings already updated).
    They must be quick (no I/O: buffer it, as the store writer does); one
    that raises is logged and skipped, and the task is unaffected.
    """

    def task_queued(self, handle: TaskHandle, tasks: Cancellable) -> None:
        """A task was queued on `tasks`, its collection (``pending``)."""

    def task_started(self, handle: TaskHandle) -> None:
        """An attempt of the task began (``running``; ``attempts`` counts them)."""

    def task_retrying(self, handle: TaskHandle, error: BaseException, wait_s: float) -> None:
        """Attempt ``handle.attempts`` raised `error`; the next starts in about `wait_s` s."""

    def task_ended(self, handle: TaskHandle) -> None:
        """The task reached its end state (``handle.status``: done, failed, cancelled)."""

    def task_handed_off(self, handle: TaskHandle) -> None:
        """The task left this process, still ``pending`` (sent to taskiq): the
        worker that runs it reports the rest. It never reaches `task_ended` here."""


async def send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Call each receiver of `signal` for `sender`, awaiting the async ones.

    Unlike `Signal.send()`, a receiver that raises is logged and skipped, so
    neither the other receivers nor the task itself can be harmed by it.
    """
    for receiver in signal.receivers_for(sender):
        try:
            result = receiver(sender, **kwargs)
            if inspect.isawaitable(result):
                await result
        except Exception:
            _receiver_raised(signal, receiver)


def _receiver_raised(signal: Signal, receiver: Any) -> None:
    logger.exception(
        "Receiver %s of signal %r raised; it was skipped",
        getattr(receiver, "__qualname__", repr(receiver)),
        getattr(signal, "name", signal),
    )


HOOKS = ("task_queued", "task_started", "task_retrying", "task_ended", "task_handed_off")


class Hooks:
    """The hooks of some observers, per transition, in their order: looked up
    once (a tracker does so at startup), those left as the base class's
    no-ops left out, so that a transition pays only for who listens."""

    def __init__(self, observers: Sequence[TaskObserver] = ()) -> None:
        self.observers = tuple(observers)
        self.by_name: dict[str, tuple[Callable[..., None], ...]] = {
            name: tuple(
                getattr(observer, name)
                for observer in self.observers
                if getattr(type(observer), name) is not getattr(TaskObserver, name)
            )
            for name in HOOKS
        }


NO_HOOKS = Hooks()


class Reporter:
    """Reports the transitions of the tasks of one sender (an app, or `None`).

    Parameters:
        sender: The sender of the signals: the application, or `None`.
        hooks: The observers told of every transition, in this order.
        loop: The loop the observers' books belong to (a tracker's); a
            transition made in another thread is handed over to it.
        grace: Seconds a cut-off run may spend reporting its losses.
    """

    def __init__(
        self,
        sender: Any = None,
        hooks: Hooks = NO_HOOKS,
        loop: Loop | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.sender = sender
        self.hooks = hooks
        self.loop = loop
        self.grace = grace

    def _tell(self, name: str, *args: Any) -> None:
        for hook in self.hooks.by_name[name]:
            try:
                hook(*args)
            except Exception:
                logger.exception("Observer hook %r raised; it was skipped", hook)

    # Synchronous transitions: from add_task, possibly in a worker thread.

    def queued(self, handle: TaskHandle, tasks: Cancellable) -> None:
        """A task was queued on `tasks`."""
        if self.loop is not None:
            self.loop.run(self._tell, "task_queued", handle, tasks)
        else:
            self._tell("task_queued", handle, tasks)

    def queued_late(
        self, handle: TaskHandle, tasks: Cancellable, func: Callable[..., Any], reason: str
    ) -> None:
        """Queued on a closed collection: queued, then abandoned at once, on
        the loop, so that no observer or receiver races the loop's own."""
        if self.loop is not None:
            self.loop.run(self._queued_late, handle, tasks, func, reason)
            return
        if current_library() is None:
            import anyio.from_thread

            try:
                anyio.from_thread.run_sync(self._queued_late, handle, tasks, func, reason)
            except RuntimeError:  # a thread foreign to every event loop: here, then
                pass
            else:
                return
        self._queued_late(handle, tasks, func, reason)

    def _queued_late(
        self, handle: TaskHandle, tasks: Cancellable, func: Callable[..., Any], reason: str
    ) -> None:
        self._tell("task_queued", handle, tasks)
        self.abandoned_now(handle, func, reason)

    def abandoned_now(self, handle: TaskHandle, func: Callable[..., Any], reason: str) -> None:
        """`abandoned`, from synchronous code on the loop: sync receivers are
        called at once, async ones start in a task of their own."""
        self._abandon(handle, reason)
        if not task_abandoned.receivers:
            return
        kwargs = {"handle": handle, "task_id": handle.task_id, "func": func, "reason": reason}
        for receiver in task_abandoned.receivers_for(self.sender):
            try:
                result = receiver(self.sender, **kwargs)
            except Exception:
                _receiver_raised(task_abandoned, receiver)
                continue
            if inspect.isawaitable(result):
                self._spawn(result)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        if current_library() is None:
            # A thread foreign to every event loop (one the app started itself).
            if inspect.iscoroutine(awaitable):  # pragma: no branch  (else: nothing to close)
                awaitable.close()
            logger.warning("An async signal receiver was skipped: no event loop to run it on")
            return

        async def deliver() -> None:
            try:
                await awaitable
            except Exception:
                logger.exception("An async signal receiver raised; it was skipped")

        (self.loop or Loop()).spawn(deliver)

    def _abandon(self, handle: TaskHandle, reason: str) -> None:
        handle._finish(TaskStatus.CANCELLED)
        logger.warning("Background task %s (%s) abandoned: %s", handle.task_id, handle.name, reason)
        self._tell("task_ended", handle)

    def handed_off(self, handle: TaskHandle, wait: Callable[[], Awaitable[None]]) -> None:
        """The task was sent out of this process (to a taskiq broker): its
        handle stays ``pending`` here, `wait()` awaits `wait`, and the
        process that runs it reports the rest."""
        handle._hand_off(wait)
        logger.debug("Background task %s (%s) handed off", handle.task_id, handle.name)
        self._tell("task_handed_off", handle)

    # The run's transitions, on the loop.

    async def started(self, handle: TaskHandle, func: Callable[..., Any]) -> None:
        """An attempt begins: running, ``attempts`` + 1, `task_started`."""
        handle._start()
        self._tell("task_started", handle)
        if task_started.receivers:
            await send(task_started, self.sender, handle=handle, task_id=handle.task_id, func=func)

    async def completed(self, handle: TaskHandle, func: Callable[..., Any]) -> None:
        """It returned: done, `task_completed`."""
        handle._finish(TaskStatus.DONE)
        self._tell("task_ended", handle)
        if task_completed.receivers:
            await send(
                task_completed,
                self.sender,
                handle=handle,
                task_id=handle.task_id,
                func=func,
                duration_s=handle.duration_s,
            )

    async def failed(
        self, handle: TaskHandle, func: Callable[..., Any], error: BaseException
    ) -> None:
        """It raised `error`: failed, an ERROR log line, `task_failed`."""
        handle._finish(TaskStatus.FAILED, error)
        # Never the arguments: they carry addresses, tokens and other personal data.
        logger.error("Background task %s (%s) failed", handle.task_id, handle.name, exc_info=error)
        self._tell("task_ended", handle)
        if task_failed.receivers:
            await send(
                task_failed,
                self.sender,
                handle=handle,
                task_id=handle.task_id,
                func=func,
                duration_s=handle.duration_s,
                error=error,
            )

    async def retrying(
        self, handle: TaskHandle, func: Callable[..., Any], error: BaseException, wait_s: float
    ) -> None:
        """Attempt ``handle.attempts`` raised `error`; the next starts in `wait_s` s."""
        logger.warning(
            "Background task %s (%s) raised %s on attempt %d; retrying in %.2f s",
            handle.task_id,
            handle.name,
            type(error).__name__,
            handle.attempts,
            wait_s,
        )
        self._tell("task_retrying", handle, error, wait_s)
        if task_retrying.receivers:
            await send(
                task_retrying,
                self.sender,
                handle=handle,
                task_id=handle.task_id,
                func=func,
                attempt=handle.attempts,
                error=error,
                wait_s=wait_s,
            )

    async def abandoned(self, handle: TaskHandle, func: Callable[..., Any], reason: str) -> None:
        """It will never run or finish: cancelled, with `reason` (a sentence)."""
        self._abandon(handle, reason)
        if task_abandoned.receivers:
            await send(
                task_abandoned,
                self.sender,
                handle=handle,
                task_id=handle.task_id,
                func=func,
                reason=reason,
            )
