from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from types import FunctionType, TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol

import anyio
import anyio.to_thread
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import HTTPConnection
from starlette.types import Scope

from ._handle import PENDING, RUNNING, TaskHandle, callable_name, handed_off
from ._lifecycle import UNBOUND, Reporter
from ._limiter import current_thread_limiter
from ._tracing import current_observer
from ._tracker import ON_TRIO, Cutoff, binding_of

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TrackedBackgroundTasks"]

P = ParamSpec("P")


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR
_COROUTINE = inspect.CO_COROUTINE
current_task = asyncio.current_task
_new_task = object.__new__


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
        f"add_task() got a generator function ({callable_name(func)}),"
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
    response: ``Response(..., background=BackgroundTasks())``, or
    `for_request(request)` to have it tracked by the app's `TaskTracker`.

    Parameters:
        tasks: Starlette `BackgroundTask` objects to queue, in order; each gets
            a handle of its own in `handles`.
    """

    # Slots: a collection is built per request, and slot reads and writes are
    # cheaper than an instance dict's (Starlette's class still gives one).
    __slots__ = (
        "_accepting",
        "_cancel_reason",
        "_closed",
        "_cutoff",
        "_host",
        "_report",
        "_runners",
        "_spawn",
        "_started",
        "handles",
        "tasks",  # Starlette's attribute: a slot here too, so no instance dict is filled
    )

    def __init__(self, tasks: Sequence[BackgroundTask] | None = None) -> None:
        self.tasks: list[BackgroundTask] = []
        self.handles: list[TaskHandle] = []
        self._report: Reporter = UNBOUND
        self._runners: dict[int, TaskRunner] | None = None  # by index, for special tasks
        self._started = False
        self._accepting = True  # neither started nor closed
        self._closed: str | None = None  # why later tasks cannot run, once closed
        self._cancel_reason: str | None = None
        self._host: Any = None  # what `cancel()` cancels while it runs
        # Set by `for_request` when a tracker may `cancel()` it: what makes its
        # run cancellable (see `run`).
        self._cutoff: Cutoff | None = None
        # Set by `for_request` in detached mode: hands the run to the tracker.
        self._spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], bool] | None = None
        if not tasks:
            return
        for task in tasks:
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

    @classmethod
    def for_request(cls, connection: HTTPConnection | Scope) -> Self:
        """A collection for this request's application: its signals are sent
        with the app as sender, and the app's `TaskTracker` (if its lifespan
        runs) tracks its tasks. The FastAPI provider builds them this way."""
        scope = connection if type(connection) is dict else connection.scope  # type: ignore[union-attr]
        tasks = cls()
        binding = binding_of(scope)
        tasks._report = binding.reporter
        tasks._cutoff = binding.cutoff
        tasks._spawn = binding.spawn
        # Without a global tracer provider, no span of ours would record.
        if binding.traced and (tracing := current_observer()) is not None:  # a span records
            report = tasks._report
            tasks._report = Reporter(report.sender, (*report.observers, tracing))
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
        run (a non-callable, a coroutine object, a generator function) and
        `RuntimeError` while the collection runs; nothing is queued then.
        Once a request's collection is closed (its tasks have run or were
        abandoned), the handle returned has already ended ``cancelled``,
        with a `task_abandoned` signal and a WARNING that say why.
        """
        if self._accepting and type(func) is FunctionType:
            # The common case, in one screen: a plain function on an open
            # collection. BackgroundTask(func, ...) is built without its
            # general (and, per task, costly) check for an async callable.
            flags = func.__code__.co_flags
            if not flags & _GENERATOR_FLAGS:
                # Starlette types its fields with its own ParamSpec: as Any.
                loose_args: Any = args
                loose_kwargs: Any = kwargs
                task = _new_task(BackgroundTask)
                task.func = func
                task.args = loose_args
                task.kwargs = loose_kwargs
                task.is_async = flags & _COROUTINE != 0
                # Named as `callable_name(func)` names it, joined when read.
                handle = TaskHandle(func.__qualname__, func.__module__)
                self.tasks.append(task)
                self.handles.append(handle)
                if (queued := self._report.on_queued) is not None:
                    queued(handle, self)
                return handle
        _check_task_callable(func)
        if self._closed is not None:
            handle = TaskHandle(callable_name(func))
            self._report.queued_late(handle, self, func, self._closed)
            return handle
        if self._started:
            raise RuntimeError(
                "add_task() was called on a BackgroundTasks collection that has"
                " already started running; queue tasks before the response is"
                " sent, or build a new collection for later work"
            )
        return self._queue(BackgroundTask(func, *args, **kwargs))

    def _queue(self, task: BackgroundTask) -> TaskHandle:
        func = task.func
        handle = TaskHandle(callable_name(func))
        if type(func) is not FunctionType and (runner := _runner_for(func)) is not None:
            # A runner may name the task better (taskiq: the task's name).
            handle.name = getattr(runner, "name", handle.name)
            if self._runners is None:
                self._runners = {}
            self._runners[len(self.tasks)] = runner
        self.tasks.append(task)
        self.handles.append(handle)
        if (queued := self._report.on_queued) is not None:
            queued(handle, self)
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
        leaving the block is the end of the request (`end_request`): the tasks
        run, or are abandoned if the block raised, and the collection closes."""
        if exc is None and not self._started and self._spawn is None:
            # The common ending, on every request (the FastAPI provider exits
            # the collection this way): `end_request(None)`, without a
            # coroutine in between.
            await self.run()
            self._closed = _RAN
            return
        await self.end_request(exc)

    async def end_request(self, error: BaseException | None) -> None:
        """Settle the collection at the end of its request, and close it.

        If the request succeeded, its tasks run now (unless they already ran,
        as a response's background), or in detached mode
        (``TaskTracker(detach=True)``) start in the tracker's task group and
        this returns at once; if it failed with `error`, each ends
        ``cancelled``. Either way the collection is closed: a task added to it
        later ends ``cancelled`` at once, loudly, and is never left pending.
        """
        if error is None:
            if not self._started:
                spawn = self._spawn
                if spawn is not None and spawn(self._run_detached):
                    self._started = True  # claimed: it runs once, detached
                    self._close(
                        "it was queued after the request's background tasks had been"
                        " handed to the TaskTracker to run detached (detach=True)"
                    )
                    return
                await self.run()
            self._close(_RAN)
        else:
            self._close(
                "it was queued after the request failed and its background tasks were abandoned"
            )
            with anyio.CancelScope(shield=True):
                await self._abandon(
                    f"the request failed with {type(error).__name__} before its tasks ran"
                )

    def _close(self, reason: str) -> None:
        self._closed = reason
        self._accepting = False

    async def cancel(self, reason: str) -> None:
        """Cut the collection off: every unfinished task ends ``cancelled`` with
        `reason`. A running collection is cancelled and reports its own losses
        as it unwinds; one not yet running is abandoned at once."""
        host = self._host
        if host is not None and self._cancel_reason is None:
            self._cancel_reason = reason
            host.cancel()
        else:
            # Not running, or still running after a first cancel (a task
            # that swallows cancellation): report the losses now.
            await self._abandon(reason)

    async def run(self) -> None:
        """Run the queued tasks, one after the other; a collection runs once.

        Raises `RuntimeError` if it has already run. Cancellation is not
        swallowed: the running task and those queued behind it end
        ``cancelled``, each with a `task_abandoned` signal, and the
        cancellation propagates (unless it came from `cancel()`).
        """
        # Each task in turn, isolated; the whole run in this one coroutine (one
        # more per collection costs 0.1 us, a fourteenth of Starlette's task).
        #
        # A tracked collection (``_cutoff`` set) can be cut off by the drain
        # (`cancel()`). On asyncio that costs no cancel scope (creating and
        # entering an anyio one costs more than the rest of a request's
        # tracking together): the host task is recorded, cancelled only if the
        # drain has to, and its own cancellation taken back here. On trio, a
        # native cancel scope wraps the run instead.
        if self._started:
            raise RuntimeError(
                "This BackgroundTasks collection has already run, and a"
                " collection runs once; build a new BackgroundTasks() for more work"
            )
        self._started = True
        self._accepting = False
        host = None
        cutoff = self._cutoff
        if cutoff is not None:
            if cutoff is ON_TRIO:  # by identity: cheaper than isinstance()
                if self._host is None:
                    await _run_in_trio_scope(self)  # which runs this again, scoped
                    return
            else:
                # The tracker's loop (mypy cannot narrow by identity), passed
                # to `current_task()`: without it, the call costs twice as much
                # before Python 3.12 (and requests run on that loop).
                loop: asyncio.AbstractEventLoop = cutoff  # type: ignore[assignment]
                self._host = host = current_task(loop) or current_task()
        report = self._report
        tasks = self.tasks
        runners = self._runners
        failed = False  # whether a task failed: its arguments are forgotten then
        try:
            # Neither zip() nor enumerate(): Python 3.11 runs a plain loop over
            # a list faster, by some 80 ns per collection (zip with strict=True,
            # which linters ask for, costs as much as a no-op task).
            index = -1
            for handle in self.handles:
                index += 1
                if handle.status is not PENDING:
                    continue  # abandoned before the collection ran
                task = tasks[index]
                if runners is not None and (runner := runners.get(index)) is not None:
                    await runner(report, handle, task)
                    failed = failed or handle.error is not None
                    continue
                func: Callable[..., Any] = task.func
                try:
                    if (signal := report.started(handle, func)) is not None:
                        await signal
                    if task.is_async:
                        # `call(task)`, inline (a coroutine less per task); and
                        # without keywords, no dict is built for them (~35 ns).
                        kwargs = task.kwargs
                        result = await (func(*task.args, **kwargs) if kwargs else func(*task.args))
                        if result is not None:
                            await settle(task, result)
                    else:
                        await run_sync(task)
                except Exception as exc:
                    failed = True
                    if handle.status is RUNNING:  # not reported lost meanwhile
                        await report.failed(handle, func, exc)
                else:
                    if handle.status is RUNNING and (signal := report.completed(handle, func)):
                        await signal
        except BaseException as exc:
            # Cancelled in a task, or in a receiver awaited between tasks:
            # every task that has not ended is reported lost (those before it
            # have all ended), so that none ends without a trace.
            with anyio.CancelScope(shield=True):
                await self._abandon(self._cancel_reason or _CANCELLED)
            if (
                host is not None
                and self._cancel_reason is not None
                and isinstance(exc, asyncio.CancelledError)
            ):
                # Cancelled by `cancel()`: take that cancellation back, and
                # let it on only if someone else cancelled the host as well.
                uncancel = getattr(host, "uncancel", None)  # Python >= 3.11
                if uncancel is None or not uncancel():
                    return
            raise
        finally:
            if host is not None:
                self._host = None
            if failed and cutoff is not None:
                _forget_arguments(self)

    __call__ = run  # `await tasks()`, as Starlette's responses run their background

    async def _run_detached(self) -> None:
        """`run()` in the tracker's task group (detached mode), which the
        hand-off claimed for it."""
        self._started = False
        await self.run()

    async def _abandon(self, cause: str) -> None:
        """End every unfinished task as cancelled, loudly."""
        for task, handle in zip(self.tasks, self.handles, strict=True):
            if handle.finished or handed_off(handle):
                continue
            if handle.status is RUNNING:
                reason = f"{cause}; it was cut off while running"
            else:
                reason = f"{cause}; it never started"
            await self._report.abandoned(handle, task.func, reason)


_RAN = "it was queued after the request's background tasks had run"

_CANCELLED = (
    "the request's background work was cancelled (by the server, for instance at"
    " shutdown past its graceful-shutdown timeout: uvicorn --timeout-graceful-shutdown,"
    " hypercorn --graceful-timeout; or by the caller)"
)


async def _run_in_trio_scope(tasks: TrackedBackgroundTasks) -> None:
    """`run()` on trio, where a native cancel scope is cheap; `run()` calls
    this, which calls it again inside the scope."""
    import trio

    with trio.CancelScope() as scope:
        tasks._host = scope
        tasks._started = False  # claimed again, at once, by the same run, now scoped
        try:
            await tasks.run()
        finally:
            tasks._host = None


def _forget_arguments(tasks: TrackedBackgroundTasks) -> None:
    """A tracked collection has run, and a task failed: a failed handle, kept
    in the tracker's history, keeps its exception and a traceback that still
    formats, but not the request's arguments. Its frames' locals are
    cleared, and so are the tasks' arguments, which the run's own frames
    still reach (from Python 3.12, a finished frame keeps its caller's frame
    alive)."""
    for handle in tasks.handles:
        if handle.error is not None:
            traceback.clear_frames(handle.error.__traceback__)
    no_args: Any = ()
    no_kwargs: Any = {}
    for task in tasks.tasks:
        task.args = no_args
        task.kwargs = no_kwargs


class TaskRunner(Protocol):
    """Runs one special task (one with options, or one sent to a queue) in
    place of the run loop's plain call, reporting each transition itself."""

    async def __call__(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        """Run `task`, whose handle is `handle`, through `report`; raise only
        what is not the task's own failure (cancellation)."""


def _runner_for(func: Any) -> TaskRunner | None:
    """The runner of a special task, or `None` for a plain one."""
    # On the type: a Mock or a proxy answers any attribute of its instances.
    make = getattr(type(func), "bgplus_runner", None)
    if make is not None:
        return make(func)  # type: ignore[no-any-return]
    if "taskiq" in sys.modules:  # never imported for it: a taskiq task implies it
        from .taskiq import runner_for

        return runner_for(func)
    return None


async def call(task: BackgroundTask) -> None:
    """Call a task the plain way: awaited, or in a worker thread."""
    if task.is_async:
        result = await task.func(*task.args, **task.kwargs)
        if result is not None:
            await settle(task, result)
    else:
        await run_sync(task)


async def run_sync(task: BackgroundTask) -> None:
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
    else:
        await settle(task, result)


async def settle(task: BackgroundTask, result: Any) -> None:
    """The work left in what a task's call returned: a coroutine object is
    awaited, and a generator (whose body never ran) fails the task. Anything
    else is a plain return value, or work already running on its own (an
    `asyncio.Task`, a future): left alone."""
    if inspect.iscoroutine(result):
        # `return send(x)`, an `await` forgotten in an `async def` wrapper:
        # the work it meant, which would otherwise never run.
        await result
    elif inspect.isgenerator(result) or inspect.isasyncgen(result):
        # A generator function behind a plain wrapper (a decorator, a
        # lambda): add_task cannot see it, and the body never ran. Failed,
        # loudly, rather than done.
        raise TypeError(
            f"background task {callable_name(task.func)} returned a generator object,"
            f" so its body never ran; a generator runs only when iterated: queue a"
            f" plain 'def' or 'async def' function that iterates it"
        )
