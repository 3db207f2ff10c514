from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import Scope

from ._handle import TaskHandle, TaskStatus, finished_mono
from ._lifecycle import Cancellable, TaskObserver
from ._limiter import current_thread_limiter
from ._store import STORE_METHODS, UNFINISHED, StoreWriter

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
_TASK_ID = re.compile(r"[0-9a-f]{32}")

Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def tracker_of(scope: Scope) -> TaskTracker | None:
    """The tracker serving the application of this request, if any."""
    state = scope.get("state")
    return state.get(_STATE_KEY) if state else None


class _Ledger:
    """The tracker's books: live tasks, the bounded history, counts since
    startup. The `TaskObserver` through which every transition reaches it."""

    def __init__(self, history_size: int, history_ttl: float | None) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.live: dict[str, tuple[TaskHandle, Cancellable]] = {}
        self.history: OrderedDict[str, TaskHandle] = OrderedDict()
        self.counts = dict.fromkeys(_END_STATES, 0)
        self.idle: anyio.Event | None = None

    def task_queued(self, handle: TaskHandle, run: Cancellable) -> None:
        self.live[handle.task_id] = (handle, run)

    def task_started(self, handle: TaskHandle) -> None:
        pass

    def task_ended(self, handle: TaskHandle) -> None:
        self.live.pop(handle.task_id, None)
        self.counts[handle.status] += 1
        if self.history_size:
            history = self.history
            history[handle.task_id] = handle
            if len(history) > self.history_size:
                history.popitem(last=False)
            self.expire(time.perf_counter())
        if self.idle is not None and not self.live:
            self.idle.set()

    def get(self, task_id: str) -> TaskHandle | None:
        entry = self.live.get(task_id)
        if entry is not None:
            return entry[0]
        self.expire(time.perf_counter())
        return self.history.get(task_id)

    def expire(self, now: float) -> None:
        """Drop finished handles older than `history_ttl` at `now` (`time.perf_counter()`)."""
        if self.history_ttl is None:
            return
        deadline = now - self.history_ttl
        history = self.history
        while history:
            # Handles enter the history as they finish, so the oldest is first.
            oldest = next(iter(history.values()))
            if finished_mono(oldest) >= deadline:  # type: ignore[operator]
                break
            history.popitem(last=False)


_END_STATES = (TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED)


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
        self.store = store
        self.lease_ttl = lease_ttl
        self._ledger = _Ledger(history_size, history_ttl)
        self._observers: tuple[TaskObserver, ...] = (self._ledger,)
        self._serving = False

    def __repr__(self) -> str:
        ledger = self._ledger
        return f"<TaskTracker in_flight={len(ledger.live)} history={len(ledger.history)}>"

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
        return [handle for handle, _ in self._ledger.live.values()]

    def router(self, prefix: str = "", **kwargs: Any) -> APIRouter:
        """A FastAPI router serving ``GET {prefix}/{task_id}`` → `TaskHandle.to_dict()`.

        It answers from `lookup()`: with a store, for the tasks of every
        process sharing it. Unknown, expired or malformed ids get `404`; `503`
        if the store cannot be reached. Keyword arguments go to
        `fastapi.APIRouter` (``tags=``, ``dependencies=`` for auth, ...).
        """
        from fastapi import APIRouter, HTTPException

        router = APIRouter(prefix=prefix, **kwargs)

        @router.get("/{task_id}", summary="Status of a background task")
        async def task_status(task_id: str) -> dict[str, Any]:
            try:
                record = await self.lookup(task_id)
            except Exception as exc:
                # Not logged per request: the store's writer already warns, once per window.
                raise HTTPException(status_code=503, detail="Task store unavailable") from exc
            if record is None:
                raise HTTPException(status_code=404, detail="Unknown task id")
            return record

        return router

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
        ledger.counts = dict.fromkeys(_END_STATES, 0)
        if self.thread_limit is not None:
            current_thread_limiter().total_tokens = self.thread_limit
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
                    # Raised again below, as it is: from inside the task group
                    # it would come out wrapped in an exception group.
                    error = exc
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._drain()
                    group.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            # The tasks are drained and the loop has stopped: write the last
            # records (those of tasks cut off included), within a bound.
            with anyio.CancelScope(shield=True):
                await writer.close()
            self._observers = (ledger,)

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
        self._observers = (self._ledger, writer)
        return writer

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
        counts = ledger.counts
        logger.log(
            logging.WARNING if counts[TaskStatus.CANCELLED] else logging.INFO,
            "Background tasks drained in %.2f s (%d in flight at shutdown);"
            " since startup: %d done, %d failed, %d abandoned",
            time.perf_counter() - started,
            in_flight,
            counts[TaskStatus.DONE],
            counts[TaskStatus.FAILED],
            counts[TaskStatus.CANCELLED],
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
