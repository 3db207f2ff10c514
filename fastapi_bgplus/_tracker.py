from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import anyio
import anyio.abc
from starlette.types import Scope

from ._eventloop import current_library
from ._handle import TaskHandle, TaskStatus, finished_mono
from ._identity import Memo, remember
from ._lifecycle import UNBOUND, AppReporter, Cancellable, Reporter, TaskObserver
from ._limiter import current_thread_limiter
from ._store import STORE_METHODS, UNFINISHED, StoreWriter
from ._tracing import provider_set

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ._store import TaskStore

__all__ = ["DEFAULT_HISTORY_SIZE", "DEFAULT_HISTORY_TTL", "TaskTracker"]

logger = logging.getLogger("fastapi_bgplus")

DEFAULT_HISTORY_SIZE = 10_000
"""Finished handles a `TaskTracker` keeps for lookup, by default."""

DEFAULT_HISTORY_TTL = 3600.0
"""Seconds a finished handle stays available for lookup, by default."""

_STATE_KEY = "fastapi_bgplus.tracker"
_TASK_ID = re.compile(r"[0-9a-f]{32}")  # as the status route checks it

Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


ON_TRIO: Final = "trio"

Cutoff: TypeAlias = "asyncio.AbstractEventLoop | Literal['trio']"
"""How the drain can cut a collection's run off: on asyncio, the tracker's
event loop (the run's host task is recorded on it); on trio, `ON_TRIO` (the
run goes in a cancel scope)."""


class Binding:
    """What a request's collection takes from its app (and the app's tracker,
    if one serves it): the reporter of the app's tasks, how its run can be cut
    off, the detached runner, and whether its tasks may be traced."""

    __slots__ = ("cutoff", "reporter", "spawn", "traced")

    def __init__(
        self,
        reporter: Reporter,
        cutoff: Cutoff | None,
        spawn: Callable[[Callable[[], Any]], bool] | None,
        traced: bool,
    ) -> None:
        self.reporter = reporter
        self.cutoff = cutoff
        self.spawn = spawn
        self.traced = traced
        """Whether each collection checks for a recording span. With a tracker:
        whether a global tracer provider was set at the app's first request
        after startup (without one, no span of ours records). Without one:
        always, as there is no startup to read it again at."""


def binding_of(scope: Scope) -> Binding:
    """The `Binding` of this request's collection.

    Built once per app (the one the request belongs to: a mounted sub-app has
    its own) and tracker start, or once per app that no tracker serves, and
    shared by its requests: this is on every request's path."""
    state = scope.get("state")
    if state:
        tracker: TaskTracker | None = state.get(_STATE_KEY)
        if tracker is not None:
            app = scope.get("app")
            last_app, binding = tracker._last_binding  # one read: threads may bind too
            return binding if last_app is app else tracker._bind(app)
    return _untracked_binding(scope.get("app"))


_NO_APP = Binding(UNBOUND, None, None, traced=True)
"""The binding of a collection whose request names no app: no sender, no
observers, and the check for a recording span at every collection."""

_NOT_BOUND: tuple[Any, Binding] = (object(), _NO_APP)  # a tracker's last binding, before any

# Per app that no tracker serves (apps need not be hashable): its binding,
# whose reporter holds the app weakly, so that an app that goes leaves nothing.
_untracked: Memo[Binding] = {}


def _untracked_binding(app: Any) -> Binding:
    if app is None:
        return _NO_APP
    known = _untracked.get(id(app))
    if known is not None and known[0]() is app:
        return known[1]
    try:
        return remember(_untracked, app, Binding(AppReporter(app), None, None, traced=True))[1]
    except TypeError:  # an app that cannot be weakly referenced: one per request
        return Binding(Reporter(app), None, None, traced=True)


class _Ledger:
    """The tracker's books: live tasks, the bounded history, counts since
    startup. The `TaskObserver` through which every transition reaches it."""

    def __init__(self, history_size: int, history_ttl: float | None) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        # The unfinished, by id: each handle, and the run that can cut it off,
        # in the order queued. Per task: one insert, one removal.
        self.live: dict[str, tuple[TaskHandle, Cancellable]] = {}
        # The finished, oldest first; past `history_size` the oldest drop out.
        # Ending a task costs an append: they are indexed by id only when
        # someone asks (`get`), in the status route's time, not the request's.
        self.finished: deque[TaskHandle] = deque(maxlen=history_size)
        self.ended = 0  # handles ever appended to `finished`: the n-th is number n
        self._numbers: dict[str, int] = {}  # a finished handle's number, by id
        self._numbered = 0  # `ended`, when `_numbers` last caught up
        self.failed = self.abandoned = 0  # since startup
        self.ended_before = 0  # `ended` at startup
        self.idle: anyio.Event | None = None

    def task_queued(self, handle: TaskHandle, run: Cancellable) -> None:
        self.live[handle.task_id] = (handle, run)

    task_started = None  # the ledger books only arrivals and ends

    def task_ended(self, handle: TaskHandle) -> None:
        live = self.live
        live.pop(handle.task_id, None)
        status = handle.status  # by identity: hashing an enum member is slow
        if status is not DONE:  # the done are counted by difference (`done`)
            if status is FAILED:
                self.failed += 1
            else:
                self.abandoned += 1
        self.finished.append(handle)
        self.ended += 1
        if not self.ended & 255:
            # Now and then, not at every end: `get()` expires handles itself,
            # and `history_size` bounds the memory meanwhile.
            self.expire(time.perf_counter())
        if not live and self.idle is not None:
            self.idle.set()

    @property
    def done(self) -> int:
        """Tasks done since startup."""
        return self.ended - self.ended_before - self.failed - self.abandoned

    def task_handed_off(self, handle: TaskHandle) -> None:
        # Its record is the store's now (the worker writes it): neither in
        # flight here, nor in the history, where it would stay pending.
        self.live.pop(handle.task_id, None)
        if self.idle is not None and not self.live:
            self.idle.set()

    def get(self, task_id: str) -> TaskHandle | None:
        entry = self.live.get(task_id)
        if entry is not None:
            return entry[0]  # (handle, run)
        self.expire(time.perf_counter())
        finished = self.finished
        if self._numbered != self.ended:
            self._number(finished)
        number = self._numbers.get(task_id)
        oldest = self.ended - len(finished) + 1  # the number of `finished[0]`
        if number is None or number < oldest:
            return None  # unknown, or no longer in the history
        return finished[number - oldest]

    def _number(self, finished: deque[TaskHandle]) -> None:
        """Number the handles that ended since the last call."""
        numbers = self._numbers
        fresh = self.ended - self._numbered
        if fresh >= len(finished) or len(numbers) > 2 * len(finished) + 1024:
            # Those that left the history are many: start afresh.
            numbers.clear()
            fresh = len(finished)
        number = self.ended - fresh
        for handle in itertools.islice(finished, len(finished) - fresh, None):
            number += 1
            numbers[handle.task_id] = number
        self._numbered = self.ended

    @property
    def in_flight(self) -> list[TaskHandle]:
        return [handle for handle, _ in self.live.values()]

    def expire(self, now: float) -> None:
        """Drop finished handles older than `history_ttl` at `now` (`time.perf_counter()`)."""
        finished = self.finished
        ttl = self.history_ttl
        if ttl is None:
            return
        # Handles are appended as they finish, so the oldest is first.
        while finished and (finished_mono(finished[0]) or 0.0) + ttl <= now:
            finished.popleft()


DONE = TaskStatus.DONE
FAILED = TaskStatus.FAILED


class TaskTracker:
    """Lifespan hook that tracks background tasks, serves their status and drains them.

    Pass `lifespan` (or `wrap(your_lifespan)`) to `FastAPI(...)` or
    `Starlette(...)`. While the application runs, every task queued through
    one of its requests is tracked: `get()` finds it by id, `in_flight` lists
    those not yet finished. At shutdown the hook waits up to `drain_timeout`
    seconds for them, then cancels what is left; every task cut off is logged
    at WARNING and signalled with `task_abandoned`.

    Parameters:
        drain_timeout: Seconds the lifespan shutdown waits for tasks still in
            flight before cutting them off (`math.inf`: no limit). Servers
            such as uvicorn wait for requests, background work included,
            before the lifespan shutdown starts: see the README.
        history_size: Finished handles kept for `get()`; the oldest go first.
        history_ttl: Seconds a finished handle is kept; `None` for no limit.
        thread_limit: If set, the number of worker threads sync tasks may use
            at once, applied at startup (see `current_thread_limiter()`).
        store: A `TaskStore` shared by every process of the application
            (`SQLiteStore`, `RedisStore`, your own), so that `lookup()` and
            the status route answer for the tasks of all of them. Records are
            written from behind, every 0.2 s, never on the request path. At
            startup the store must answer (or the startup fails with its
            error); later failures are logged and retried, and never fail a
            request or a task.
        lease_ttl: Seconds this process's lease in the store lasts; it is
            renewed every third of that. Once it has lapsed (the process was
            killed), its unfinished tasks answer status ``"lost"``.
        detach: Detached mode: once a request is done, its tasks are handed to
            the tracker's own task group and the request ends at once, so the
            server no longer counts background work as a request in flight;
            the drain (`drain_timeout`) alone governs shutdown. The price: the
            request's `yield` dependencies have exited before its tasks run.

    Raises `ValueError` for an argument out of its range, saying what is valid,
    and `TypeError` for a store that lacks methods of the `TaskStore` protocol.
    One tracker serves one application at a time: starting it while it serves
    raises `RuntimeError`. It may start again once shut down.
    """

    def __init__(
        self,
        *,
        drain_timeout: float = 30.0,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: float | None = DEFAULT_HISTORY_TTL,
        thread_limit: int | None = None,
        store: TaskStore | None = None,
        lease_ttl: float = 30.0,
        detach: bool = False,
    ) -> None:
        if not _is_seconds(drain_timeout):
            raise ValueError(
                f"drain_timeout must be a number of seconds >= 0 (math.inf to wait"
                f" for every task), got {drain_timeout!r}"
            )
        if not _is_count(history_size, 0):
            raise ValueError(
                f"history_size must be an int >= 0 (0 keeps no finished handles),"
                f" got {history_size!r}"
            )
        if history_ttl is not None and not (_is_seconds(history_ttl) and history_ttl > 0):
            raise ValueError(
                f"history_ttl must be a number of seconds > 0, or None to keep handles"
                f" until history_size pushes them out; got {history_ttl!r}"
            )
        if thread_limit is not None and not _is_count(thread_limit, 1):
            raise ValueError(f"thread_limit must be an int >= 1, or None; got {thread_limit!r}")
        if not isinstance(detach, bool):
            raise ValueError(f"detach must be True or False, got {detach!r}")
        if not (_is_seconds(lease_ttl) and 0 < lease_ttl < math.inf):
            raise ValueError(f"lease_ttl must be a number of seconds > 0, got {lease_ttl!r}")
        if store is not None:
            missing = [name for name in STORE_METHODS if not callable(getattr(store, name, None))]
            if missing:
                raise TypeError(
                    f"store must implement the TaskStore protocol ({', '.join(STORE_METHODS)});"
                    f" {type(store).__name__} lacks {', '.join(missing)}"
                )
        self.drain_timeout = drain_timeout
        self.thread_limit = thread_limit
        self.detach = detach
        self.store = store
        self.lease_ttl = lease_ttl
        self._task_group: anyio.abc.TaskGroup | None = None  # detached runs, while serving
        self._ledger = _Ledger(history_size, history_ttl)
        self._observers: tuple[TaskObserver, ...] = (self._ledger,)
        self._serving = False
        self._cutoff: Cutoff = ON_TRIO  # set at startup
        self._bindings: dict[int, Binding] = {}  # by the id of the app
        # The app that asked last, and its binding: most servers serve one app.
        self._last_binding: tuple[Any, Binding] = _NOT_BOUND

    def __repr__(self) -> str:
        ledger = self._ledger
        return f"<TaskTracker in_flight={len(ledger.live)} history={len(ledger.finished)}>"

    @property
    def history_size(self) -> int:
        """Finished handles kept for `get()`."""
        return self._ledger.history_size

    @property
    def history_ttl(self) -> float | None:
        """Seconds a finished handle is kept for `get()`; `None`: no limit."""
        return self._ledger.history_ttl

    @property
    def observers(self) -> tuple[TaskObserver, ...]:
        """Who hears the transitions of the tasks this tracker tracks (bound
        to each request's collection by `TrackedBackgroundTasks.for_request`)."""
        return self._observers

    # Lookup

    def get(self, task_id: str) -> TaskHandle | None:
        """The handle of the task with this id, or `None` if it is unknown or expired.

        Only this process's tasks: see `lookup()` for those of every process."""
        return self._ledger.get(task_id)

    async def lookup(self, task_id: str) -> dict[str, Any] | None:
        """The `TaskHandle.to_dict()` record of a task of any process sharing
        the store, or `None` if it is unknown, expired or malformed.

        This process's own tasks are answered from memory, at once; others
        from the store, where an unfinished task whose process's lease has
        lapsed answers status ``"lost"``. Without a store, only this
        process's tasks are known. Raises what the store raises when it
        cannot be reached (the status route answers `503` then).
        """
        handle = self._ledger.get(task_id)
        if handle is not None:
            return handle.to_dict()
        store = self.store
        if store is None or not _TASK_ID.fullmatch(task_id):
            return None
        record = await store.get(task_id)
        if record is None:
            return None
        owner = record.pop("owner", None)
        if record["status"] in UNFINISHED and not (
            isinstance(owner, str) and await store.lease_alive(owner)
        ):
            record["status"] = TaskStatus.LOST.value
        return record

    @property
    def in_flight(self) -> list[TaskHandle]:
        """Handles of the tracked tasks that have not finished, oldest first."""
        return self._ledger.in_flight

    def router(self, prefix: str = "", **kwargs: Any) -> APIRouter:
        """A FastAPI router serving ``GET {prefix}/{task_id}`` → `TaskHandle.to_dict()`.

        It answers from `lookup()`: with a store, for the tasks of every
        process sharing it. Unknown, expired or malformed ids get `404`, and
        `503` if the store cannot be reached; OpenAPI documents the record's
        fields. Keyword arguments go to `fastapi.APIRouter` (``tags=``,
        ``dependencies=`` for auth, ...).
        """
        from fastapi import HTTPException

        from ._router import status_router

        async def lookup(task_id: str) -> dict[str, Any] | None:
            try:
                return await self.lookup(task_id)
            except Exception as exc:
                # Not logged per request: the store's writer warns, once per window.
                raise HTTPException(status_code=503, detail="Task store unavailable") from exc

        return status_router(lookup, prefix, **kwargs)

    # Lifespan

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[dict[str, Any]]:
        """The lifespan hook alone: ``FastAPI(lifespan=tracker.lifespan)``.

        Raises `RuntimeError` if this tracker already serves an application.
        """
        with self._serving_guard():
            async with self._draining():
                yield {_STATE_KEY: self}

    def wrap(
        self, lifespan: Lifespan
    ) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
        """Wrap the application's own lifespan: ``FastAPI(lifespan=tracker.wrap(lifespan))``.

        Its startup runs first and its state reaches requests as before; at
        shutdown the tasks are drained *before* its shutdown code runs, so
        they can still use what it set up.
        """

        @asynccontextmanager
        async def wrapped(app: Any) -> AsyncIterator[dict[str, Any]]:
            # Checked before the wrapped startup runs, so it never runs twice.
            with self._serving_guard():
                async with lifespan(app) as state, self._draining():
                    yield {**(state or {}), _STATE_KEY: self}

        return wrapped

    @contextmanager
    def _serving_guard(self) -> Iterator[None]:
        if self._serving:
            raise RuntimeError(
                "This TaskTracker is already serving an application; create one"
                " TaskTracker per application (or per worker process)"
            )
        self._serving = True
        try:
            yield
        finally:
            self._serving = False

    @asynccontextmanager
    async def _draining(self) -> AsyncIterator[None]:
        ledger = self._ledger
        ledger.failed = ledger.abandoned = 0
        ledger.ended_before = ledger.ended
        self._cutoff = ON_TRIO if current_library() == "trio" else asyncio.get_running_loop()
        self._unbind()
        if self.thread_limit is not None:
            current_thread_limiter().total_tokens = self.thread_limit
        async with self._detached_runs():
            if self.store is None:
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._drain()
                return
            writer = await self._start_writer(self.store)
            error: BaseException | None = None
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(writer.run)
                    try:
                        yield
                    except BaseException as exc:
                        # Raised again below, as it is: from inside the task
                        # group it would come out wrapped in an exception group.
                        error = exc
                    finally:
                        with anyio.CancelScope(shield=True):
                            await self._drain()
                        group.cancel_scope.cancel()
                if error is not None:
                    raise error
            finally:
                # The tasks are drained and the loop has stopped: write the
                # last records (those of tasks cut off included), within a bound.
                with anyio.CancelScope(shield=True):
                    await writer.close()
                self._set_observers((ledger,))

    async def _start_writer(self, store: TaskStore) -> StoreWriter:
        writer = StoreWriter(store, lease_ttl=self.lease_ttl, history_ttl=self._ledger.history_ttl)
        try:
            await writer.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                await store.aclose()  # what it opened before failing
            raise RuntimeError(
                f"TaskTracker could not reach its task store {store!r} at startup:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        self._set_observers((self._ledger, writer))
        return writer

    def _set_observers(self, observers: tuple[TaskObserver, ...]) -> None:
        self._observers = observers
        self._unbind()  # the bindings hold the observers they were built with

    def _bind(self, app: Any) -> Binding:
        """The binding of `app`'s collections, built at its first request
        since startup, and remembered as the last app's."""
        # By id: the binding's reporter holds the app, so the id stays its own.
        binding = self._bindings.get(id(app))
        if binding is None:
            binding = self._bindings[id(app)] = Binding(
                Reporter(app, self.observers),
                self._cutoff,
                self.spawn if self.detach else None,
                provider_set(),
            )
        self._last_binding = (app, binding)
        return binding

    def _unbind(self) -> None:
        self._bindings = {}
        self._last_binding = _NOT_BOUND

    # Detached mode

    @asynccontextmanager
    async def _detached_runs(self) -> AsyncIterator[None]:
        """With ``detach=True``, the task group of the requests' detached runs,
        open from startup until the drain is over."""
        if not self.detach:
            yield
            return
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            try:
                yield
            finally:
                self._task_group = None
                # The drain has ended every run or reported it lost; one that
                # ignored its cancellation must not hold the shutdown up.
                task_group.cancel_scope.cancel()

    def spawn(self, run: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Start `run` in the tracker's task group (detached mode), in a copy
        of the caller's context; `False` if there is none (not serving, or
        ``detach=False``). A request's collection hands itself over this way."""
        task_group = self._task_group
        if task_group is None:
            return False
        task_group.start_soon(run)
        return True

    async def _drain(self) -> None:
        ledger = self._ledger
        started = time.perf_counter()
        in_flight = len(ledger.live)
        if ledger.live:
            logger.info(
                "Shutting down: waiting up to %s s for %d background task(s)",
                self.drain_timeout,
                in_flight,
            )
            await self._wait_idle(self.drain_timeout)
        if ledger.live:
            await self._cut_off(
                f"the application shut down and drain_timeout ({self.drain_timeout} s) ran out"
            )
        logger.log(
            logging.WARNING if ledger.abandoned else logging.INFO,
            "Background tasks drained in %.2f s (%d in flight at shutdown);"
            " since startup: %d done, %d failed, %d abandoned",
            time.perf_counter() - started,
            in_flight,
            ledger.done,
            ledger.failed,
            ledger.abandoned,
        )

    async def _wait_idle(self, seconds: float) -> None:
        ledger = self._ledger
        ledger.idle = anyio.Event()
        with anyio.move_on_after(seconds):
            await ledger.idle.wait()
        ledger.idle = None

    async def _cut_off(self, reason: str) -> None:
        live = self._ledger.live
        for run in {run for _, run in live.values()}:
            await run.cancel(reason)
        if live:
            # The cancelled runs report their own losses as they unwind.
            await self._wait_idle(_UNWIND_GRACE)
        for run in {run for _, run in live.values()}:
            # A task that swallowed its cancellation is still reported lost.
            await run.cancel(reason)


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and value >= 0
    )


_UNWIND_GRACE = 5.0
"""Seconds the drain gives cancelled tasks to report themselves lost."""
