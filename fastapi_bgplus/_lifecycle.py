"""The one place a task's fate is reported.

Every runner (the in-request loop, a detached run, a taskiq worker) calls
a `Reporter` at each transition (`handed_off` when the task leaves the
process, sent to a queue); each of its methods updates the handle, tells
the observers (tracker, store, tracing), writes the log line and sends the
blinker signal, in that order. A new observer is a `TaskObserver`; a new
runner calls these and touches nothing else.

The transitions on the hot path (`started`, `completed`) are plain methods
that return the signal still to be delivered, or `None` when nobody listens:
an extra coroutine per transition would cost more than the task itself.
"""

from __future__ import annotations

import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from blinker import Signal

from ._eventloop import current_library
from ._handle import DONE, RUNNING, TaskHandle, TaskStatus
from ._signals import send
from .signals import task_abandoned, task_completed, task_failed, task_retrying, task_started

__all__ = ["UNBOUND", "AppReporter", "Cancellable", "Reporter", "TaskObserver"]

logger = logging.getLogger("fastapi_bgplus")

_now = time.perf_counter  # the handles' clock: monotonic, for durations


class Cancellable(Protocol):
    """Something running tasks that can be cut off (a collection, a detached run)."""

    async def cancel(self, reason: str) -> None:
        """End every unfinished task as cancelled, with `reason`."""


class TaskObserver(Protocol):
    """Hears every transition of the tasks it is bound to.

    Called synchronously on the event loop, in the order of the transitions;
    it must be quick (no I/O: buffer it) and must not raise. An observer with
    no interest in a transition sets that hook to `None`: the reporter then
    skips it, at no cost per task.
    """

    @property
    def task_queued(self) -> Callable[[TaskHandle, Cancellable], None] | None:
        """``(handle, run)``: a task was queued; `run` can cut it off."""

    @property
    def task_started(self) -> Callable[[TaskHandle], None] | None:
        """``(handle)``: an attempt of the task began (``handle.attempts`` counts them)."""

    @property
    def task_ended(self) -> Callable[[TaskHandle], None] | None:
        """``(handle)``: the task reached its end state (``handle.status``)."""

    @property
    def task_handed_off(self) -> Callable[[TaskHandle], None] | None:
        """``(handle)``: the task left this process, still ``pending`` (sent to
        a queue such as taskiq's): where it runs now reports the rest of its
        life, so forget it here. It never reaches `task_ended` in this process."""


class Reporter:
    """Reports the transitions of the tasks of one sender (an app, or `None`)
    to its observers, the log and the blinker signals.

    Runners hold one and call it at each transition; `started` and
    `completed` return the signal delivery still to await, or `None`.
    """

    __slots__ = (
        "_on_ended",
        "_on_handed_off",
        "_on_queued",
        "_on_started",
        "_started",
        "observers",
        "on_ended",
        "on_queued",
        "sender",
    )

    _on_queued: tuple[Callable[[TaskHandle, Cancellable], None], ...]
    _on_started: tuple[Callable[[TaskHandle], None], ...]
    _on_ended: tuple[Callable[[TaskHandle], None], ...]
    _on_handed_off: tuple[Callable[[TaskHandle], None], ...]

    def __init__(self, sender: Any, observers: Sequence[TaskObserver] = ()) -> None:
        self.sender = sender
        self.observers = tuple(observers)
        self.on_queued: Callable[[TaskHandle, Cancellable], None] | None = None
        """What `add_task` calls with ``(handle, run)``: `queued`, or the one
        observer hook it would call; `None` when no observer listens."""
        self.on_ended: Callable[[TaskHandle], None] | None = None
        """What `completed` calls with the handle: `ended`, or the one observer
        hook it would call; `None` when no observer listens."""
        self._started: Callable[[TaskHandle], None] | None = None  # as `on_ended`
        if not observers:  # a collection without a tracker: built per request
            self._on_queued = self._on_started = self._on_ended = self._on_handed_off = ()
            return
        # Each transition's hooks, looked up once: a task pays only for the
        # observers that listen to it.
        self._on_queued = tuple([o.task_queued for o in observers if o.task_queued])
        self._on_started = tuple([o.task_started for o in observers if o.task_started])
        self._on_ended = tuple([o.task_ended for o in observers if o.task_ended])
        self._on_handed_off = tuple([o.task_handed_off for o in observers if o.task_handed_off])
        # The tracker's ledger, alone: its hooks are called without a call in between.
        self.on_queued = _caller(self._on_queued, self.queued)
        self.on_ended = _caller(self._on_ended, self.ended)
        self._started = _caller(self._on_started, self._started_all)

    def queued(self, handle: TaskHandle, run: Cancellable) -> None:
        """A task was queued on `run`, which can cut it off."""
        for hook in self._on_queued:
            hook(handle, run)

    def ended(self, handle: TaskHandle) -> None:
        """Tell every observer that the task reached its end state."""
        for hook in self._on_ended:
            hook(handle)

    def _started_all(self, handle: TaskHandle) -> None:
        for hook in self._on_started:
            hook(handle)

    def started(self, handle: TaskHandle, func: Callable[..., Any]) -> Awaitable[None] | None:
        """An attempt begins: running, ``attempts`` + 1, `task_started`."""
        handle.status = RUNNING
        handle.attempts += 1
        if handle._started_mono is None:  # the first attempt's start
            handle._started_mono = _now()
        if (hook := self._started) is not None:
            hook(handle)
        if not task_started.receivers:
            return None
        return send(task_started, self.sender, handle=handle, task_id=handle.task_id, func=func)

    def completed(self, handle: TaskHandle, func: Callable[..., Any]) -> Awaitable[None] | None:
        # `_finish(handle, DONE)`, inlined: every task that succeeds passes here
        # (its `error` is still None), and the call is measurable per task.
        handle.status = DONE
        handle._finished_mono = _now()
        if handle._finished_event is not None:
            handle._finished_event.set()
        if (ended := self.on_ended) is not None:
            ended(handle)
        if not task_completed.receivers:
            return None
        return send(
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
        _finish(handle, TaskStatus.FAILED, error)
        # Never the arguments: they carry addresses, tokens and other personal data.
        logger.error("Background task %s (%s) failed", handle.task_id, handle.name, exc_info=error)
        self.ended(handle)
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

    def handed_off(self, handle: TaskHandle, func: Callable[..., Any]) -> None:
        """The task was sent out of this process (to a taskiq broker): its
        handle stays ``pending`` here, and the process that runs it reports
        the rest (status in the task store, signals there)."""
        handle._handed_off = True
        if handle._finished_event is not None:
            handle._finished_event.set()  # `wait()` wakes, and says where to look
        logger.debug("Background task %s (%s) handed off", handle.task_id, handle.name)
        for hook in self._on_handed_off:
            hook(handle)

    def _abandon(self, handle: TaskHandle, reason: str) -> None:
        _finish(handle, TaskStatus.CANCELLED)
        logger.warning("Background task %s (%s) abandoned: %s", handle.task_id, handle.name, reason)
        self.ended(handle)

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

    def queued_late(
        self, handle: TaskHandle, run: Cancellable, func: Callable[..., Any], reason: str
    ) -> None:
        """Queued on a closed collection: `queued`, then `abandoned_now`, from
        synchronous code (`add_task`). From a worker thread (a ``def``
        dependency's exit code), both are made on the event loop, as every
        other transition is, so that no observer or receiver races it."""
        if current_library() is None:
            import anyio.from_thread

            try:
                anyio.from_thread.run_sync(self._queued_late, handle, run, func, reason)
            except RuntimeError:  # a thread foreign to every event loop: here, then
                pass
            else:
                return
        self._queued_late(handle, run, func, reason)

    def _queued_late(
        self, handle: TaskHandle, run: Cancellable, func: Callable[..., Any], reason: str
    ) -> None:
        self.queued(handle, run)
        self.abandoned_now(handle, func, reason)

    def abandoned_now(self, handle: TaskHandle, func: Callable[..., Any], reason: str) -> None:
        """`abandoned`, from synchronous code (`add_task` on a closed collection).

        Sync receivers are called at once; async ones are started in the
        background of the running event loop (see `_spawn`); off the loop,
        use `queued_late`.
        """
        self._abandon(handle, reason)
        if task_abandoned.receivers:
            _send_now(
                task_abandoned,
                self.sender,
                handle=handle,
                task_id=handle.task_id,
                func=func,
                reason=reason,
            )


_Hook = TypeVar("_Hook", bound=Callable[..., None])


def _caller(hooks: tuple[_Hook, ...], fan_out: _Hook) -> _Hook | None:
    """What to call for a transition: the one hook, `fan_out` (which calls
    them all) for several, or `None` for none."""
    if len(hooks) == 1:
        return hooks[0]
    return fan_out if hooks else None


def _finish(handle: TaskHandle, status: TaskStatus, error: BaseException | None = None) -> None:
    """Running or pending to an end state; wakes every `wait()`."""
    handle.status = status
    handle.error = error
    handle._finished_mono = _now()
    if handle._finished_event is not None:
        handle._finished_event.set()


UNBOUND = Reporter(None)
"""The reporter of a collection that knows no application and no observer."""


class AppReporter(Reporter):
    """The reporter of an app that no tracker serves (no observers), kept per
    app: it holds the app weakly, so that keeping it keeps nothing alive."""

    __slots__ = ("_app",)

    @property  # the app, held weakly
    def sender(self) -> Any:
        return self._app()

    @sender.setter
    def sender(self, app: Any) -> None:
        self._app = weakref.ref(app)


def _send_now(signal: Signal, sender: Any, **kwargs: Any) -> None:
    for receiver in signal.receivers_for(sender):
        try:
            result = receiver(sender, **kwargs)
            if inspect.isawaitable(result):
                _spawn(result)
        except Exception:
            logger.exception(
                "Receiver %s of signal %r raised; it was skipped",
                getattr(receiver, "__qualname__", repr(receiver)),
                getattr(signal, "name", signal),
            )


_background: set[Any] = set()  # strong references to running asyncio tasks


def _spawn(awaitable: Awaitable[Any]) -> None:
    """Await `awaitable` in a task of its own on the running event loop."""

    async def deliver() -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("An async signal receiver raised; it was skipped")

    library = current_library()
    if library is None:
        # A thread foreign to every event loop (one the app started itself):
        # `queued_late` makes the transitions of an anyio worker thread on the loop.
        if inspect.iscoroutine(awaitable):  # pragma: no branch  (else: nothing to close)
            awaitable.close()
        logger.warning("An async signal receiver was skipped: no event loop to run it on")
        return
    if library == "trio":
        import trio

        trio.lowlevel.spawn_system_task(deliver)
    else:
        import asyncio

        task = asyncio.get_running_loop().create_task(deliver())
        _background.add(task)
        task.add_done_callback(_background.discard)
