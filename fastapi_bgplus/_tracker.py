"""`TaskTracker`: the lifespan hook that tracks, serves, drains and names tasks."""

from __future__ import annotations

import builtins
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._backend import Cutoff, Loop
from ._collection import STATE_KEY, owned_by_tracker
from ._console import (
    MAX_PAGE,
    decode_cursor,
    encode_cursor,
    key_of,
    record_of,
    since_seconds,
    stored_statuses,
    summarize,
    wanted_statuses,
)
from ._exceptions import NotServing, QueueFull
from ._handle import TaskHandle, TaskStatus
from ._limiter import current_thread_limiter
from ._report import DEFAULT_GRACE, NO_HOOKS, Cancellable, Hooks, Reporter, TaskObserver
from ._store import STORE_METHODS, TASKIQ_OWNER, UNFINISHED, ConsoleStore, Record, StoreWriter

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ._store import TaskStore
    from ._tracing import SpanObserver

__all__ = ["DEFAULT_HISTORY_SIZE", "DEFAULT_HISTORY_TTL", "DEFAULT_STORE_TIMEOUT", "TaskTracker"]

logger = logging.getLogger("fastapi_bgplus")

DEFAULT_HISTORY_SIZE = 10_000
"""Finished handles a `TaskTracker` keeps for lookup, by default."""

DEFAULT_HISTORY_TTL = 3600.0
"""Seconds a finished handle stays available for lookup, by default."""

DEFAULT_STORE_TIMEOUT = 5.0
"""Seconds a store call made for a request (a lookup) may take, by default."""

STATS_LIMIT = 10_000
"""The most records `TaskTracker.stats` reads (the newest of its window)."""

Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]

NOT_SERVING = (
    "This TaskTracker's lifespan is not running, so it tracks no task. Install it:"
    " FastAPI(lifespan=tracker.lifespan), FastAPI(lifespan=tracker.wrap(your_lifespan))"
    " or tracker.install(app); in tests, `with TestClient(app) as client:` runs it."
    " (Starlette never runs a mounted sub-app's lifespan: install it on the outer app.)"
)


class _Ledger(TaskObserver):
    """The tracker's books: the live tasks, the bounded history, the counts
    since startup. Changed on the event loop only (the `Reporter` hands a
    worker thread's transitions over); read from anywhere."""

    def __init__(self, history_size: int, history_ttl: float | None) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        # The unfinished, by id, in the order queued: each handle, and the
        # collection that can cut it off.
        self.live: dict[str, tuple[TaskHandle, Cancellable]] = {}
        # The finished, by id, oldest first.
        self.history: OrderedDict[str, TaskHandle] = OrderedDict()
        self.done = self.failed = self.abandoned = 0  # since startup
        self.idle: anyio.Event | None = None

    def task_queued(self, handle: TaskHandle, tasks: Cancellable) -> None:
        # Handed over from a thread the app started itself, it may reach the
        # loop after the task has already ended there.
        if handle.finished or handle.handed_off:
            return
        self.live[handle.task_id] = (handle, tasks)

    def task_ended(self, handle: TaskHandle) -> None:
        self.live.pop(handle.task_id, None)
        if handle.status is TaskStatus.DONE:
            self.done += 1
        elif handle.status is TaskStatus.FAILED:
            self.failed += 1
        else:
            self.abandoned += 1
        if self.history_size:
            self.history[handle.task_id] = handle
            if len(self.history) > self.history_size:
                self.history.popitem(last=False)
        self.expire()
        self._check_idle()

    def task_handed_off(self, handle: TaskHandle) -> None:
        # Its record is the store's now (the worker writes it): neither in
        # flight here, nor in the history, where it would stay pending.
        self.live.pop(handle.task_id, None)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.live and self.idle is not None:
            self.idle.set()

    def expire(self) -> None:
        """Drop the finished handles older than `history_ttl` (the oldest are first)."""
        if self.history_ttl is None:
            return
        horizon = time.monotonic() - self.history_ttl
        while self.history:
            oldest = next(iter(self.history.values()))
            if (oldest.finished_clock or 0.0) > horizon:
                break
            self.history.popitem(last=False)

    def get(self, task_id: str) -> TaskHandle | None:
        entry = self.live.get(task_id)
        if entry is not None:
            return entry[0]
        handle = self.history.get(task_id)
        if handle is None or self.history_ttl is None:
            return handle
        finished = handle.finished_clock or 0.0
        return handle if finished > time.monotonic() - self.history_ttl else None

    def in_flight(self) -> list[TaskHandle]:
        # list() copies the values in one step, so a reader in a worker
        # thread never iterates the dict while the loop changes it.
        return [handle for handle, _ in list(self.live.values())]

    def runs(self) -> list[Cancellable]:
        """The collections of the live tasks, each once, in the order queued."""
        return list(dict.fromkeys(tasks for _, tasks in list(self.live.values())))

    async def wait_idle(self, seconds: float) -> None:
        """Wait until no task is live, at most `seconds`."""
        if not self.live:
            return
        self.idle = anyio.Event()
        with anyio.move_on_after(seconds):
            await self.idle.wait()
        self.idle = None


class TaskTracker:
    """Lifespan hook that tracks background tasks, serves their status and drains them.

    Pass `lifespan` (or `wrap(your_lifespan)`) to `FastAPI(...)` or
    `Starlette(...)`, or call `install(app)`. While the application runs,
    every task queued through one of its requests is tracked: `get()` finds
    it by id, `in_flight` lists those not yet finished. At shutdown the hook
    waits up to `drain_timeout` seconds for them, then cancels what is left;
    every task cut off is logged at WARNING and signalled with `task_abandoned`.

    Parameters:
        drain_timeout: Seconds the lifespan shutdown waits for tasks still in
            flight before cutting them off (`math.inf`: no limit). The whole
            shutdown takes at most this plus `shutdown_grace`, whatever the
            tasks, receivers and store do.
        shutdown_grace: Seconds cut-off tasks get to report themselves lost
            (their async `task_abandoned` receivers included); a task that
            ignores its cancellation is reported lost and left behind, and so
            is a receiver past it. Also bounds the store's last write.
        history_size: Finished handles kept for `get()`; the oldest go first.
        history_ttl: Seconds a finished handle is kept; `None` for no limit.
        thread_limit: If set, the number of worker threads sync tasks may use
            at once, applied at startup (see `current_thread_limiter()`).
        store: A `TaskStore` shared by every process of the application
            (`SQLiteStore`, `RedisStore`, your own), so that `lookup()` and
            the status route answer for the tasks of all of them. Records are
            written from behind, never on the request path. At startup the
            store must answer (or the startup fails with its error); later
            failures are logged and retried, and never fail a request or a task.
        store_timeout: Seconds a store call made for a request (`lookup()`,
            the status route) may take; past it the route answers 503.
        lease_ttl: Seconds this process's lease in the store lasts (at least
            1); it is renewed every third of that. Once it has lapsed (the
            process was killed), its unfinished tasks answer status ``"lost"``.
        detach: Detached mode: once a request is done, its tasks are handed to
            the tracker and the request ends at once, so the server no longer
            counts background work as a request in flight; the drain
            (`drain_timeout`) alone governs shutdown. The price: the request's
            `yield` dependencies have exited before its tasks run.
        max_concurrent: With `detach`, how many requests' collections run at
            once; the others wait, first come first served. `None`: no limit.
        max_queued: With `max_concurrent`, how many collections may wait;
            past it, `add_task()` raises `QueueFull`. `None`: no limit.
        observers: `TaskObserver` objects told of every transition of every
            tracked task (audit logs, metrics: `prometheus.PrometheusMetrics`).
        expose_errors: Whether records (the status route, the console, the
            store) carry a failed task's exception message, as
            ``error_message`` (its first 500 characters). Off by default:
            messages may hold personal data. The exception's type is always
            there, as ``error``.

    Raises `ValueError` for an argument out of its range, saying what is valid,
    and `TypeError` for a store that lacks methods of the `TaskStore` protocol.
    One tracker serves one application at a time: starting it while it serves
    raises `RuntimeError`. It may start again once shut down.
    """

    def __init__(
        self,
        *,
        drain_timeout: float = 30.0,
        shutdown_grace: float = DEFAULT_GRACE,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: float | None = DEFAULT_HISTORY_TTL,
        thread_limit: int | None = None,
        store: TaskStore | None = None,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
        lease_ttl: float = 30.0,
        detach: bool = False,
        max_concurrent: int | None = None,
        max_queued: int | None = None,
        observers: Sequence[TaskObserver] = (),
        expose_errors: bool = False,
    ) -> None:
        _check_seconds("drain_timeout", drain_timeout, " (math.inf to wait for every task)")
        _check_seconds("shutdown_grace", shutdown_grace, "", finite=True)
        if not _is_count(history_size, 0):
            raise ValueError(
                f"history_size must be an int >= 0 (0 keeps no finished handles),"
                f" got {history_size!r}"
            )
        if history_ttl is not None:
            _check_seconds("history_ttl", history_ttl, ", or None for no limit", positive=True)
        if thread_limit is not None and not _is_count(thread_limit, 1):
            raise ValueError(f"thread_limit must be an int >= 1, or None; got {thread_limit!r}")
        if not isinstance(detach, bool):
            raise ValueError(f"detach must be True or False, got {detach!r}")
        if not isinstance(expose_errors, bool):
            raise ValueError(f"expose_errors must be True or False, got {expose_errors!r}")
        _check_seconds("lease_ttl", lease_ttl, " (it is renewed every third of it)", least=1.0)
        _check_seconds("store_timeout", store_timeout, "", positive=True, finite=True)
        if max_concurrent is not None and not _is_count(max_concurrent, 1):
            raise ValueError(
                f"max_concurrent must be an int >= 1 (collections run at once), or None"
                f" for no limit; got {max_concurrent!r}"
            )
        if max_queued is not None and not _is_count(max_queued, 0):
            raise ValueError(
                f"max_queued must be an int >= 0 (collections waiting), or None for no"
                f" limit; got {max_queued!r}"
            )
        if max_concurrent is not None and not detach:
            raise ValueError(
                "max_concurrent limits detached runs: pass detach=True too (without it,"
                " each request runs its own tasks; limit a function with"
                " @task(concurrency=N) instead)"
            )
        if max_queued is not None and max_concurrent is None:
            raise ValueError(
                "max_queued bounds the collections waiting for max_concurrent: pass"
                " detach=True and max_concurrent=N too"
            )
        if store is not None:
            missing = [name for name in STORE_METHODS if not callable(getattr(store, name, None))]
            if missing:
                raise TypeError(
                    f"store must implement the TaskStore protocol ({', '.join(STORE_METHODS)});"
                    f" {type(store).__name__} lacks {', '.join(missing)}"
                )
        for observer in observers:
            if not isinstance(observer, TaskObserver):
                raise TypeError(
                    f"observers must be TaskObserver instances (subclass"
                    f" fastapi_bgplus.TaskObserver), got {type(observer).__name__!r}"
                )
        self.drain_timeout = drain_timeout
        self.shutdown_grace = shutdown_grace
        self.thread_limit = thread_limit
        self.detach = detach
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.store = store
        self.store_timeout = store_timeout
        self.lease_ttl = lease_ttl
        self.expose_errors = expose_errors
        self.cancel_allowed = False
        """Whether a router of this tracker serves the cancel route (and so the
        dashboard shows a cancel button)."""
        self._ledger = _Ledger(history_size, history_ttl)
        self._user_observers = tuple(observers)
        self._writer: StoreWriter | None = None
        self._loop: Loop | None = None
        self._hooks = NO_HOOKS
        self._slots: anyio.Semaphore | None = None
        self._accepted = 0  # detached collections with a place (see `reserve`)

    def __repr__(self) -> str:
        ledger = self._ledger
        return f"<TaskTracker in_flight={len(ledger.live)} history={len(ledger.history)}>"

    @property
    def serving(self) -> bool:
        """Whether its lifespan runs (it tracks tasks only then)."""
        return self._loop is not None

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
        """Who hears the transitions of the tracked tasks: the tracker's own
        books, the store writer while serving, then the `observers` given."""
        own: tuple[TaskObserver, ...] = (self._ledger,)
        if self._writer is not None:
            own += (self._writer,)
        return own + self._user_observers

    # What a request's collection takes from the tracker while it serves.

    def reporter(self, app: Any, span: SpanObserver | None = None) -> Reporter:
        """The `Reporter` of a request's collection in `app` (with `span`, the
        observer of its tasks' spans, when a span records)."""
        hooks = self._hooks if span is None else Hooks((*self._hooks.observers, span))
        return Reporter(app, hooks, self._loop, self.shutdown_grace)

    def new_cutoff(self) -> Cutoff | None:
        """How the drain can cut a request's collection off (`None` when not serving)."""
        return None if self._loop is None else self._loop.new_cutoff()

    # Lookup

    def get(self, task_id: str) -> TaskHandle | None:
        """The handle of the task with this id, or `None` if it is unknown or expired.

        Only this process's tasks: see `lookup()` for those of every process."""
        return self._ledger.get(task_id)

    @property
    def in_flight(self) -> list[TaskHandle]:
        """Handles of the tracked tasks that have not finished, oldest first."""
        return self._ledger.in_flight()

    async def lookup(self, task_id: str | None) -> dict[str, Any] | None:
        """The `TaskHandle.to_dict()` record of a task of any process sharing
        the store, or `None` if it is unknown, expired or malformed.

        This process's own tasks are answered from memory, at once; others
        from the store, where an unfinished task whose process's lease has
        lapsed answers status ``"lost"``. Ids are lowercase hex; an uppercase
        spelling is accepted. Without a store, only this process's tasks are
        known. Raises `NotServing` if the lifespan is not running, and what
        the store raises when it cannot be reached, or `TimeoutError` past
        `store_timeout` (the status route answers `503` for each).
        """
        if not self.serving:
            raise NotServing(NOT_SERVING)
        if not isinstance(task_id, str) or not _is_task_id(task_id.lower()):
            return None
        task_id = task_id.lower()
        handle = self._ledger.get(task_id)
        if handle is not None:
            return record_of(handle, self.expose_errors)
        store = self.store
        if store is None:
            return None
        with anyio.fail_after(self.store_timeout):
            record = await store.get(task_id)
            if record is None:
                return None
            await self._settle_records(store, [record], {})
        return record

    async def _settle_records(
        self, store: TaskStore, records: builtins.list[Record], leases: dict[str, bool]
    ) -> None:
        """Make store records answers: without their owner (and without the
        exception's message unless `expose_errors`), unfinished ones whose
        owner's lease has lapsed ``lost`` (`leases` caches the owners asked)."""
        for record in records:
            owner = record.pop("owner", None)
            if not self.expose_errors:
                record.pop("error_message", None)
            if record["status"] not in UNFINISHED:
                continue
            if not isinstance(owner, str):
                alive = False
            elif owner in leases:
                alive = leases[owner]
            else:
                alive = leases[owner] = await store.lease_alive(owner)
            if not alive:
                record["status"] = TaskStatus.LOST.value

    def router(self, prefix: str = "", *, allow_cancel: bool = False, **kwargs: Any) -> APIRouter:
        """A FastAPI router for the tasks' records, under `prefix`:

        - ``GET {prefix}/{task_id}``: a task's record (`lookup()`); unknown,
          expired or malformed ids get `404`.
        - ``GET {prefix}``: a page of records, newest first (`list()`; query
          parameters ``status`` (repeatable), ``name``, ``since``, ``limit``,
          ``cursor``).
        - ``GET {prefix}/stats``: counts and durations per task (`stats()`;
          ``window`` in seconds).
        - With `allow_cancel`, ``POST {prefix}/{task_id}/cancel``: `cancel()`
          (`202`, `404` unknown, `409` finished). It refuses a request a
          cross-site form could send (`403`): send it with an
          ``X-Requested-With`` header or a JSON body.

        With a store, they answer for the tasks of every process sharing it;
        `503` if the store cannot answer in `store_timeout`, or if the
        tracker's lifespan is not running (the detail says how to install
        it). OpenAPI documents every answer. Keyword arguments go to
        `fastapi.APIRouter`: ``tags=``, and ``dependencies=`` for auth (the
        routes are served only where you include the router).
        """
        from ._router import status_router

        if not isinstance(allow_cancel, bool):
            raise ValueError(f"allow_cancel must be True or False, got {allow_cancel!r}")
        router = status_router(self, prefix, allow_cancel=allow_cancel, **kwargs)
        self.cancel_allowed = self.cancel_allowed or allow_cancel
        for route in router.routes:
            owned_by_tracker[getattr(route, "endpoint", None)] = self
        return router

    def dashboard(
        self, prefix: str = "/tasks/dashboard", *, allow_cancel: bool | None = None, **kwargs: Any
    ) -> APIRouter:
        """A FastAPI router serving a live dashboard of the tasks at ``GET {prefix}``.

        One self-contained page (no CDN, no build step, works offline):
        totals and per-task cards, the recent tasks with status filters and
        a name search, a task's details, live updates over server-sent events
        (``GET {prefix}/events``). With `allow_cancel` (by default: whether
        a `router()` of this tracker allows cancel), a cancel button, served
        by ``POST {prefix}/tasks/{task_id}/cancel``. It never shows a task's
        arguments, nor exception messages unless `expose_errors`. It sends a
        snapshot every `refresh` seconds (default 2), with the stats of the
        last `window` seconds (default 3600). The page allows no request
        outside the app (a Content-Security-Policy says so to the browser).
        One event stream lasts `stream_seconds` (default 30), then the
        browser reconnects: a server's graceful shutdown, which waits for
        open responses, waits at most that long for an open dashboard.

        Other keyword arguments go to `fastapi.APIRouter`: pass
        ``dependencies=[Depends(your_auth)]``: every route of it, the event
        stream included, goes through them. Off until you include it.
        """
        from ._dashboard import dashboard_router

        if allow_cancel is not None and not isinstance(allow_cancel, bool):
            raise ValueError(f"allow_cancel must be True, False or None, got {allow_cancel!r}")
        router = dashboard_router(self, prefix, allow_cancel, **kwargs)
        for route in router.routes:
            owned_by_tracker[getattr(route, "endpoint", None)] = self
        return router

    # Lifespan

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[dict[str, Any]]:
        """The lifespan hook alone: ``FastAPI(lifespan=tracker.lifespan)``.

        Raises `RuntimeError` if this tracker already serves an application.
        """
        async with self._serving():
            yield {STATE_KEY: self}

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
            self._check_idle()  # before the wrapped startup runs, so it never runs twice
            async with lifespan(app) as state, self._serving():
                yield {**(state or {}), STATE_KEY: self}

        owned_by_tracker[wrapped] = self
        return wrapped

    def install(self, app: Any) -> None:
        """Install the tracker into `app` (Starlette or FastAPI), whatever its
        lifespan style: a ``lifespan=``, old-style ``on_event("startup")`` /
        ``add_event_handler`` handlers (which keep running), or none.

        It wraps what the app's router runs at startup and shutdown, as
        `wrap()` does: the app's own startup first, the drain before its
        shutdown. Call it once, before the app starts."""
        router = getattr(app, "router", None)
        if router is None or not hasattr(router, "lifespan_context"):
            raise TypeError(
                f"install() takes a Starlette or FastAPI application, got {type(app).__name__!r};"
                f" for another ASGI framework, run tracker.lifespan(app) in its lifespan"
            )
        router.lifespan_context = self.wrap(router.lifespan_context)

    def _check_idle(self) -> None:
        if self.serving:
            raise RuntimeError(
                "This TaskTracker is already serving an application; create one"
                " TaskTracker per application (or per worker process)"
            )

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        self._check_idle()
        ledger = self._ledger
        ledger.done = ledger.failed = ledger.abandoned = 0
        if self.thread_limit is not None:
            current_thread_limiter().total_tokens = self.thread_limit
        if self.max_concurrent is not None:
            self._slots = anyio.Semaphore(self.max_concurrent)
        if self.store is not None:
            await self._start_writer(self.store)
        self._loop = Loop()
        self._hooks = Hooks(self.observers)  # as they stay while it serves
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                if self._writer is not None:
                    group.start_soon(self._writer.run)
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
            if self._writer is not None:
                # The tasks are drained: write the last records (those of the
                # tasks cut off included), within the grace.
                with anyio.CancelScope(shield=True):
                    await self._writer.close(self.shutdown_grace)
                self._writer = None
            self._loop = None

    async def _start_writer(self, store: TaskStore) -> None:
        writer = StoreWriter(
            store,
            lease_ttl=self.lease_ttl,
            history_ttl=self._ledger.history_ttl,
            expose_errors=self.expose_errors,
            on_cancel=self._cancel_here,
        )
        try:
            with anyio.fail_after(self.store_timeout):
                await writer.start()
        except Exception as exc:
            with anyio.move_on_after(self.shutdown_grace, shield=True):
                try:
                    await store.aclose()  # what it opened before failing
                except Exception as close_error:
                    logger.debug("Closing the task store failed: %r", close_error)
            raise RuntimeError(
                f"TaskTracker could not reach its task store {store!r} at startup:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        self._writer = writer

    # Detached mode

    def reserve(self) -> bool:
        """Take a place for a request's collection (at its first `add_task`),
        or raise `QueueFull` when ``max_concurrent`` run and ``max_queued``
        more are accepted already. Returns whether a place was taken (only
        with ``max_queued``); `release` gives it back."""
        if self.max_queued is None or self.max_concurrent is None:
            return False
        if self._accepted >= self.max_concurrent + self.max_queued:
            raise QueueFull(
                f"The background task queue is full: {self._accepted} request(s)' tasks are"
                f" accepted (max_concurrent={self.max_concurrent} running,"
                f" max_queued={self.max_queued} waiting); try again later"
            )
        self._accepted += 1
        return True

    def release(self) -> None:
        """Give back a place `reserve` took: the collection ran, or never will."""
        self._accepted -= 1

    def run_detached(self, run: Callable[[], Awaitable[None]], reserved: bool = False) -> bool:
        """In detached mode, start a request's collection (`run`) in a task of
        its own, in a copy of the request's context (with `max_concurrent`,
        once a slot is free); `False` if not detached, or not serving. The
        place `reserved` for it is given back once it has run."""
        loop, slots = self._loop, self._slots
        if not self.detach or loop is None:
            return False
        if slots is None:
            loop.spawn(run)
            return True

        async def in_turn() -> None:
            try:
                async with slots:
                    await run()
            finally:
                if reserved:
                    self.release()

        loop.spawn(in_turn)
        return True

    # Shutdown

    async def _drain(self) -> None:
        ledger = self._ledger
        started = time.monotonic()
        in_flight = len(ledger.live)
        if in_flight:
            logger.info(
                "Shutting down: waiting up to %s s for %d background task(s)",
                self.drain_timeout,
                in_flight,
            )
            await ledger.wait_idle(self.drain_timeout)
        if ledger.live:
            reason = f"the application shut down and drain_timeout ({self.drain_timeout} s) ran out"
            for run in ledger.runs():
                run.cancel(reason)
            # The cancelled runs report their own losses as they unwind.
            await ledger.wait_idle(self.shutdown_grace)
            for run in ledger.runs():
                # Still running: a task that swallowed its cancellation, or a
                # slow receiver. Reported lost now, and left behind.
                run.cancel(f"{reason}, and it did not stop within shutdown_grace")
        logger.log(
            logging.WARNING if ledger.abandoned else logging.INFO,
            "Background tasks drained in %.2f s (%d in flight at shutdown);"
            " since startup: %d done, %d failed, %d abandoned",
            time.monotonic() - started,
            in_flight,
            ledger.done,
            ledger.failed,
            ledger.abandoned,
        )

    # The console: never on the request path of the application's endpoints.

    async def cancel(self, task_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a pending or running task of any process sharing the store.

        It ends ``cancelled``, with `task_abandoned` and a WARNING saying
        `reason`: at once in this process; through the store in another,
        which picks the request up within about a second. A running `def`
        task's thread cannot be interrupted: its handle ends ``cancelled``,
        and the thread finishes on its own. The tasks queued after it in its
        request still run. Returns whether the task was found unfinished
        (and not in a taskiq worker, which this cannot reach).

        Raises `NotServing` if the lifespan is not running, and what the store
        raises, or `TimeoutError` past `store_timeout`.
        """
        if not self.serving:
            raise NotServing(NOT_SERVING)
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason must be a non-empty string (a sentence), got {reason!r}")
        if not isinstance(task_id, str) or not _is_task_id(task_id.lower()):
            return False
        task_id = task_id.lower()
        if self._cancel_here(task_id, reason):
            return True
        store = self.store
        if not isinstance(store, ConsoleStore):
            return False
        with anyio.fail_after(self.store_timeout):
            record = await store.get(task_id)
            owner = None if record is None else record.get("owner")
            if (
                record is None
                or record["status"] not in UNFINISHED
                or not isinstance(owner, str)
                or owner.startswith(TASKIQ_OWNER)
                or not await store.lease_alive(owner)
            ):
                return False
            await store.request_cancel(owner, task_id, reason)
        return True

    def _cancel_here(self, task_id: str, reason: str) -> bool:
        entry = self._ledger.live.get(task_id)
        if entry is None:
            return False
        handle, tasks = entry
        tasks.cancel_task(handle, reason)
        return True

    async def list(
        self,
        status: str | Collection[str] | None = None,
        name: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """A page of task records, newest first: ``{"items": [...], "next_cursor": ...}``.

        The records (`TaskHandle.to_dict()`, never arguments) of every process
        sharing the store, or of this process without one (its history:
        `history_size`, `history_ttl`); this process's unfinished tasks are
        read from memory. Only those whose status is `status` (one, or
        several: ``pending``, ``running``, ``done``, ``failed``,
        ``cancelled``, ``lost``), whose name is `name`, queued at or after
        `since` (a naive datetime is UTC). `limit` (1 to 1000) records at most
        per page; pass `next_cursor` as `cursor` for the next page (`None`:
        the last page). Paging visits every record once. A page filtered on
        ``lost`` (or ``running``, ``pending``) may hold fewer than `limit`
        while more follow.

        Raises `ValueError` for an argument out of range (the router: 400),
        `NotServing` if the lifespan is not running, what the store raises or
        `TimeoutError` past `store_timeout` (503), and `NotImplementedError`
        if the store is not a `ConsoleStore` (501).
        """
        if not self.serving:
            raise NotServing(NOT_SERVING)
        wanted = wanted_statuses(status)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a task name (a string), or None; got {name!r}")
        low = since_seconds(since)
        if not _is_count(limit, 1) or limit > MAX_PAGE:
            raise ValueError(f"limit must be an int from 1 to {MAX_PAGE}, got {limit!r}")
        before = None if cursor is None else decode_cursor(cursor)
        stored = stored_statuses(wanted)
        store = self.store
        found: builtins.list[Record] = []
        if store is not None:
            if not isinstance(store, ConsoleStore):
                raise NotImplementedError(
                    f"The task store {store!r} lacks what list() and stats() need:"
                    f" implement query(), request_cancel() and cancel_requests()"
                    f" (see fastapi_bgplus.ConsoleStore)"
                )
            with anyio.fail_after(self.store_timeout):
                found = await store.query(
                    statuses=stored, name=name, since=low, before=before, limit=limit
                )
                await self._settle_records(store, found, {})
        # This process's tasks from memory: the unfinished, and those whose
        # records the store does not have yet; without a store, the history.
        ledger = self._ledger
        local = ledger.in_flight()
        if store is None:
            ledger.expire()
            local += builtins.list(ledger.history.values())
        else:
            local += self._writer.unwritten() if self._writer else []
        by_id = {record["task_id"]: record for record in found}
        for handle in local:
            if stored is not None and handle.status.value not in stored:
                continue
            if name is not None and handle.name != name:
                continue
            record = record_of(handle, self.expose_errors)
            key = key_of(record)
            if (low is None or key[0] >= low) and (before is None or key < before):
                by_id[handle.task_id] = record
        ordered = sorted(by_id.values(), key=key_of, reverse=True)
        page = ordered[:limit]
        more = len(ordered) > limit or len(found) == limit
        return {
            "items": [r for r in page if wanted is None or r["status"] in wanted],
            "next_cursor": encode_cursor(key_of(page[-1])) if more and page else None,
        }

    async def stats(self, window: float = 3600.0) -> dict[str, Any]:
        """Counts and durations of the tasks queued in the last `window` seconds.

        ``{"window_s", "complete", "total": {...}, "tasks": {name: {...}}}``:
        for all tasks and per task name, ``count``, ``statuses`` (a count per
        status), ``in_flight`` (pending or running now, whenever queued),
        ``p50_s`` and ``p95_s`` (durations of the tasks that ran to done or
        failed), ``failure_rate`` (failed / (done + failed)). Across every
        process sharing the store. It reads the newest 10,000 records of the
        window at most: ``complete`` says whether that was all of them.
        Raises as `list()` does (and `ValueError` for a window out of range).
        """
        _check_seconds("window", window, "", positive=True, finite=True)
        with anyio.fail_after(self.store_timeout):
            since = datetime.now(timezone.utc) - timedelta(seconds=window)
            records, complete = await self._read_all(since=since)
            in_flight, _ = await self._read_all(status=("pending", "running"))
        return summarize(records, in_flight, window, complete)

    async def _read_all(self, **filters: Any) -> tuple[builtins.list[Record], bool]:
        """Every record `list(**filters)` pages through, up to `STATS_LIMIT`;
        and whether that was all."""
        records: builtins.list[Record] = []
        cursor = None
        while len(records) < STATS_LIMIT:
            page = await self.list(**filters, limit=MAX_PAGE, cursor=cursor)
            records += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return records, True
        return records, False


def _is_task_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_seconds(
    name: str,
    value: object,
    hint: str,
    *,
    positive: bool = False,
    finite: bool = False,
    least: float | None = None,
) -> None:
    """Refuse what is not a number of seconds in range, huge ints included."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except OverflowError:
            ok = False
        else:
            ok = not math.isnan(seconds) and (seconds > 0 if positive else seconds >= 0)
            ok = ok and not (finite and math.isinf(seconds))
            ok = ok and (least is None or least <= seconds < math.inf)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        if least is not None:
            bound = f">= {least}"
            finite = True
        finite_note = ", finite" if finite else ""
        raise ValueError(
            f"{name} must be a number of seconds {bound}{finite_note}{hint}; got {value!r}"
        )
