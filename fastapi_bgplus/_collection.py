"""`TrackedBackgroundTasks`: a request's tasks, queued, run one by one, closed."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec

import anyio
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import HTTPConnection
from starlette.routing import Mount
from starlette.types import Scope

from ._backend import Cutoff
from ._handle import TaskHandle, TaskStatus, callable_name, check_callable, queueing
from ._options import TaskFunction
from ._report import NO_HOOKS, Hooks, Reporter
from ._run import TaskRunner, run_task
from ._tracing import current_observer

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._tracker import TaskTracker

__all__ = ["STATE_KEY", "TrackedBackgroundTasks", "owned_by_tracker"]

logger = logging.getLogger("fastapi_bgplus")

P = ParamSpec("P")

STATE_KEY = "fastapi_bgplus.tracker"
"""Where a serving tracker puts itself in the lifespan state (``scope["state"]``)."""


class TrackedBackgroundTasks(StarletteBackgroundTasks):
    """A collection of background tasks that runs each one isolated and tracked.

    A drop-in for Starlette's and FastAPI's `BackgroundTasks`: `add_task()`
    takes the same arguments and returns a `TaskHandle`. The tasks run once,
    one after the other in the order added; one that raises is logged and
    marked failed, and the next still runs. `def` tasks run in worker threads
    under a dedicated limiter (see `current_thread_limiter()`).

    In FastAPI, annotate parameters with `fastapi_bgplus.BackgroundTasks` to
    receive the request's collection. Elsewhere, build one and hand it to a
    response: ``Response(..., background=BackgroundTasks())``, or
    `for_request(request)` to have it tracked by the app's `TaskTracker`.

    Parameters:
        tasks: Starlette `BackgroundTask` objects to queue, in order; each gets
            a handle of its own in `handles`.
    """

    def __init__(self, tasks: Sequence[BackgroundTask] | None = None) -> None:
        self.tasks: list[BackgroundTask] = []
        self.handles: list[TaskHandle] = []
        """The handles of the queued tasks, in order."""
        self.started = False
        """Whether the collection has started running (it runs once)."""
        self._runners: list[TaskRunner] = []
        self._report = Reporter()
        self._tracker: TaskTracker | None = None
        self._cutoff: Cutoff | None = None  # set when a tracker may cut the run off
        self._closed: str | None = None  # why later tasks cannot run, once closed
        self._cancel_reason: str | None = None
        self._current: TaskHandle | None = None  # the task the run is at
        self._stopping: tuple[TaskHandle, str] | None = None  # one task cut off (`cancel_task`)
        self._running = False
        self._reserved = False  # a place in a detached tracker's queue (`TaskTracker.reserve`)
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
                check_callable(task.func)
            self._queue(task)

    @classmethod
    def for_request(cls, connection: HTTPConnection | Scope) -> Self:
        """A collection for this request's application: its signals are sent
        with the app as sender, and the app's `TaskTracker` (if its lifespan
        runs) tracks its tasks. The FastAPI provider builds them this way."""
        scope = connection.scope if isinstance(connection, HTTPConnection) else connection
        app = scope.get("app")
        tasks = cls()
        state = scope.get("state") or {}
        tracker: TaskTracker | None = state.get(STATE_KEY)
        span = current_observer()
        if tracker is not None and tracker.serving:
            tasks._tracker = tracker
            tasks._report = tracker.reporter(app, span)
            tasks._cutoff = tracker.new_cutoff()
        else:
            _warn_if_tracker_idle(app)
            tasks._report = Reporter(app, NO_HOOKS if span is None else Hooks((span,)))
        return tasks

    @property
    def app(self) -> Any:
        """The application whose tasks these are (the sender of their
        signals), or `None` for a collection built by hand."""
        return self._report.sender

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.tasks)} task(s)>"

    def add_task(  # type: ignore[override]  # returns a TaskHandle, not None
        self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle:
        """Queue `func(*args, **kwargs)` to run after the response is sent.

        Returns the task's `TaskHandle`. Raises `TypeError` for what can never
        run (a non-callable, a coroutine object, a generator function),
        `RuntimeError` while the collection runs, and `QueueFull` when a
        detached tracker's queue is full; nothing is queued then.
        Once a request's collection is closed (its tasks have run or were
        abandoned), the handle returned has already ended ``cancelled``,
        with a `task_abandoned` signal and a WARNING that say why.
        """
        check_callable(func)
        if self._closed is not None:
            handle = TaskHandle(callable_name(func))
            self._report.queued_late(handle, self, func, self._closed)
            return handle
        if self.started:
            raise RuntimeError(
                "add_task() was called on a BackgroundTasks collection that has"
                " already started running; queue tasks before the response is"
                " sent, or build a new collection for later work"
            )
        if self._tracker is not None and not self.tasks:
            self._reserved = self._tracker.reserve()  # a detached tracker's queue may be full
        return self._queue(BackgroundTask(func, *args, **kwargs))

    def _queue(self, task: BackgroundTask) -> TaskHandle:
        runner, name = _runner_for(task.func)
        handle = TaskHandle(name)
        self.tasks.append(task)
        self.handles.append(handle)
        self._runners.append(runner)
        self._report.queued(handle, self)
        return handle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``async with TrackedBackgroundTasks.for_request(request) as tasks:``:
        leaving the block is the end of the request (see `end_request`). The
        FastAPI provider puts the collection on the request's exit stack."""
        if queueing.get() is self:
            queueing.set(None)  # the request is over (and the context may live on: a test's)
        if exc is not None:
            self._give_back_place()
            self._closed = (
                "it was queued after the request failed and its background tasks were abandoned"
            )
            await self._abandon(
                f"the request failed with {type(exc).__name__} before its tasks ran"
            )
            return
        if not self.started:
            self.started = True
            if self._tracker is not None and self._tracker.run_detached(self._run, self._reserved):
                self._closed = (
                    "it was queued after the request's background tasks had been"
                    " handed to the TaskTracker to run detached (detach=True)"
                )
                return
            self._give_back_place()
            await self._run()
        self._give_back_place()
        self._closed = "it was queued after the request's background tasks had run"

    def _give_back_place(self) -> None:
        if self._reserved and self._tracker is not None:
            self._reserved = False
            self._tracker.release()

    async def end_request(self, error: BaseException | None) -> None:
        """Settle the collection at the end of its request, and close it.

        If the request succeeded, its tasks run now (unless they already ran,
        as a response's background), or in detached mode
        (``TaskTracker(detach=True)``) are handed to the tracker and this
        returns at once; if it failed with `error`, each ends ``cancelled``.
        Either way the collection is closed: a task added to it later ends
        ``cancelled`` at once, loudly, and is never left pending.
        """
        await self.__aexit__(None if error is None else type(error), error, None)

    def cancel(self, reason: str) -> None:
        """Cut the collection off: every unfinished task ends ``cancelled`` with
        `reason`. A running collection is cancelled and reports its own losses
        as it unwinds; otherwise (not running, or still running after a first
        cancel: a task that swallows cancellation) they are reported now."""
        if self._running and self._cancel_reason is None and self._cutoff is not None:
            self._cancel_reason = reason
            if self._stopping is None:  # else the run is being cut already
                self._cutoff.cancel()
            return
        for task, handle in self._unfinished():
            self._report.abandoned_now(handle, task.func, _cut_off(handle, reason))

    def cancel_task(self, handle: TaskHandle, reason: str) -> None:
        """End one of its unfinished tasks ``cancelled`` with `reason`: a
        pending one at once (it never runs); the one running is cut off (a
        `def` task's thread finishes on its own), and the tasks after it run."""
        if handle.finished or handle.handed_off or handle not in self.handles:
            return
        if handle is self._current and self._running and self._cutoff is not None:
            if self._stopping is None and self._cancel_reason is None:
                self._stopping = (handle, reason)
                self._cutoff.cancel()
            return
        task = self.tasks[self.handles.index(handle)]
        self._report.abandoned_now(handle, task.func, reason)

    async def run(self) -> None:
        """Run the queued tasks, one after the other; a collection runs once.

        Raises `RuntimeError` if it has already run. Cancellation is not
        swallowed: the running task and those queued behind it end
        ``cancelled``, each with a `task_abandoned` signal, and the
        cancellation propagates (unless it came from `cancel()`).
        """
        if self.started:
            raise RuntimeError(
                "This BackgroundTasks collection has already run, and a"
                " collection runs once; build a new BackgroundTasks() for more work"
            )
        self.started = True
        await self._run()

    __call__ = run  # `await tasks()`, as Starlette's responses run their background

    async def _run(self) -> None:
        self._running = True
        try:
            again = True
            while again:
                again = False
                with self._cutoff or contextlib.nullcontext():
                    try:
                        for task, handle, runner in zip(
                            self.tasks, self.handles, self._runners, strict=True
                        ):
                            if handle.status is TaskStatus.PENDING:  # else abandoned before it ran
                                self._current = handle
                                await runner(self._report, handle, task)
                    except BaseException:
                        stopping, self._stopping = self._stopping, None
                        if stopping is not None and self._cancel_reason is None:
                            # One task was cut off (`cancel_task`): the rest
                            # run, under a new cutoff (each cuts once).
                            await self._abandon(stopping[1], only=stopping[0])
                            self._cutoff = self._tracker.new_cutoff() if self._tracker else None
                            again = True
                        else:
                            # Cancelled in a task, or in a receiver awaited
                            # between tasks: every task not ended is reported lost.
                            await self._abandon(self._cancel_reason or _CANCELLED)
                        raise
        except BaseException:
            # Cancelled from outside while one task was being cut off.
            await self._abandon(self._cancel_reason or _CANCELLED)
            raise
        finally:
            self._running = False
            if self._tracker is not None:
                _forget_arguments(self)

    async def _abandon(self, cause: str, only: TaskHandle | None = None) -> None:
        """End every unfinished task (or `only` that one) as cancelled, loudly,
        shielded from cancellation but within the grace: receivers that take
        longer are skipped for the tasks left, which are reported all the same."""
        with anyio.move_on_after(self._report.grace, shield=True):
            # Looked for afresh after each: the drain may report some meanwhile.
            while left := self._unfinished(only):
                task, handle = left[0]
                await self._report.abandoned(handle, task.func, _cut_off(handle, cause))
        for task, handle in self._unfinished(only):
            self._report.abandoned_now(handle, task.func, _cut_off(handle, cause))

    def _unfinished(
        self, only: TaskHandle | None = None
    ) -> list[tuple[BackgroundTask, TaskHandle]]:
        return [
            (task, handle)
            for task, handle in zip(self.tasks, self.handles, strict=True)
            if not (handle.finished or handle.handed_off) and only in (None, handle)
        ]


def _cut_off(handle: TaskHandle, cause: str) -> str:
    if handle.status is TaskStatus.RUNNING:
        return f"{cause}; it was cut off while running"
    return f"{cause}; it never started"


_CANCELLED = (
    "the request's background work was cancelled (by the server, for instance at"
    " shutdown past its graceful-shutdown timeout: uvicorn --timeout-graceful-shutdown,"
    " hypercorn --graceful-timeout; or by the caller)"
)


def _forget_arguments(tasks: TrackedBackgroundTasks) -> None:
    """A tracked collection has run, and a task failed: a failed handle, kept in
    the tracker's history, keeps its exception and a traceback that still
    formats, but not the request's arguments (its frames' locals are cleared, and so are the
    tasks' arguments, which the run's own frames still reach)."""
    failed = [handle.error for handle in tasks.handles if handle.error is not None]
    if not failed:
        return
    for error in failed:
        traceback.clear_frames(error.__traceback__)
    for task in tasks.tasks:
        task.args = ()  # type: ignore[assignment]  # Starlette types them by its ParamSpec
        task.kwargs = {}  # type: ignore[assignment]


def _runner_for(func: Any) -> tuple[TaskRunner, str]:
    """How to run `func`, and the task's name."""
    options = func if isinstance(func, TaskFunction) else None
    # A taskiq task is sent to its broker (with its options as taskiq labels);
    # taskiq is looked for only once something has imported it (the task's
    # own module did).
    if "taskiq" in sys.modules:
        from .taskiq import runner_for

        sender = runner_for(func if options is None else options.__wrapped__, options)
        if sender is not None:
            return sender, sender.name
    if options is not None:
        return options.run_task, callable_name(func)
    return run_task, callable_name(func)


owned_by_tracker: weakref.WeakKeyDictionary[Any, TaskTracker] = weakref.WeakKeyDictionary()
"""What a `TaskTracker` made for an app, and the tracker: the lifespans of
`wrap` (and `install`), and the endpoints of its status routes."""

_checked: weakref.WeakSet[Any] = weakref.WeakSet()  # the apps looked at, once each


def _tracker_installed_in(app: Any) -> TaskTracker | None:
    """The tracker whose lifespan `app` was given, if any."""
    from ._tracker import TaskTracker

    lifespan = getattr(getattr(app, "router", None), "lifespan_context", None)
    owner = getattr(lifespan, "__self__", None)  # `lifespan=tracker.lifespan`
    if isinstance(owner, TaskTracker):
        return owner
    # FastAPI merges an included router's lifespan into the app's: the status
    # route tells then.
    for part in [lifespan, *_endpoints(getattr(app, "routes", ()))]:
        try:
            tracker = owned_by_tracker.get(part)
        except TypeError:  # not weakly referenceable: not one of ours
            continue
        if tracker is not None:
            return tracker
    return None


def _endpoints(routes: Any) -> Iterator[Any]:
    """The endpoints of `routes`, and of the routes they group, at any depth
    (FastAPI 0.165 keeps an included router whole, as its `original_router`)."""
    for route in routes:
        yield getattr(route, "endpoint", None)
        if isinstance(route, Mount):  # a mounted app is another app
            continue
        included = getattr(route, "original_router", route)
        yield from _endpoints(getattr(included, "routes", ()))


def _warn_if_tracker_idle(app: Any) -> None:
    """Once per app: say so if it was given a tracker whose lifespan does not
    run (a mounted sub-app, or a test client used without ``with``)."""
    if app is None or app in _checked:
        return
    try:
        _checked.add(app)
    except TypeError:  # an app that cannot be weakly referenced: never looked at
        return
    if _tracker_installed_in(app) is None:
        return
    logger.warning(
        "Background tasks were queued in %r, whose TaskTracker's lifespan is not"
        " running: they are not tracked, and its status route answers 503. Starlette"
        " never runs a mounted sub-app's lifespan: install the tracker on the outer"
        " app; in tests, use `with TestClient(app) as client:`",
        app,
    )
