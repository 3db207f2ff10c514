"""The task store: where every process sharing it writes its tasks' records,
so that any of them can answer for any task.

`TaskStore` is the protocol a store implements (`MemoryStore` here is its
reference implementation; `SQLiteStore` and `RedisStore` are the others).
`StoreWriter` is the `TaskObserver` that writes to it from behind: a
transition only files the task's handle in a buffer, and a loop in the
tracker's lifespan writes the buffer out every `FLUSH_INTERVAL` seconds, so
no request and no task ever waits for the store.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import anyio

from ._handle import TaskHandle
from ._report import Cancellable, TaskObserver

__all__ = [
    "FLUSH_INTERVAL",
    "MAX_BUFFERED",
    "STORE_METHODS",
    "UNFINISHED",
    "ConsoleStore",
    "MemoryStore",
    "Record",
    "StoreWriter",
    "TaskStore",
    "created_of",
    "new_owner",
    "record_of",
]

logger = logging.getLogger("fastapi_bgplus")

Record = dict[str, Any]
"""`TaskHandle.to_dict()` plus ``"owner"``: the lease id of the process that wrote it."""

UNFINISHED = frozenset({"pending", "running"})
"""Statuses a record can only keep while its owner's lease is alive."""

FINISHED = frozenset({"done", "failed", "cancelled"})

STORED = ("pending", "running", "done", "failed", "cancelled")
"""The statuses a store holds (``lost`` is what a reader makes of an unfinished
record whose owner's lease has lapsed)."""

FLUSH_INTERVAL = 0.2
"""Seconds between two writes of the buffered records (and lease checks)."""

MAX_BUFFERED = 100_000
"""Records a writer holds while its store fails; past it, the oldest finished go."""

WARN_EVERY = 30.0
"""Seconds between two WARNINGs about a failing store."""

STORE_METHODS = ("put", "get", "renew_lease", "lease_alive", "aclose")
"""What every store implements."""


TASKIQ_OWNER = "taskiq-"
"""How the lease ids of taskiq workers begin (their tasks cannot be cancelled
through the store: they read no cancellation requests)."""

MAX_MESSAGE = 500
"""Characters of an exception's message a record keeps, with ``expose_errors=True``."""


def record_of(handle: TaskHandle, expose_errors: bool) -> Record:
    """`handle.to_dict()`, with the exception's message when the app opts in."""
    record = handle.to_dict()
    if expose_errors and handle.error is not None:
        record["error_message"] = str(handle.error)[:MAX_MESSAGE]
    return record


def created_of(record: Record) -> float:
    """When the record's task was queued, in seconds since the epoch: the
    order of `TaskStore.query`."""
    return datetime.fromisoformat(record["created_at"]).timestamp()


@runtime_checkable
class TaskStore(Protocol):
    """Where the processes of an application share their tasks' records.

    A record is `TaskHandle.to_dict()` plus ``"owner"``, the lease id of the
    process that wrote it. Implement these methods to plug in your own
    store (Postgres, DynamoDB...), and run the contract suite against it
    (`tests/test_store_contract.py`, with your store added to `tests/stores.py`).
    What the console needs too (`TaskTracker.list`, `stats`, `cancel`) is
    `ConsoleStore`. The tracker's writer calls them from one task at a time,
    never on the request path; lookups and the console's calls run under
    `store_timeout`.
    """

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        """Insert or replace records by ``task_id``, in order (a later record
        of the same id wins). Finished records (status done, failed or
        cancelled) expire `history_ttl` seconds after being written; `None`:
        never. Unfinished ones do not expire."""

    async def get(self, task_id: str) -> Record | None:
        """The record of this task id as last put, or `None` if unknown or expired."""

    async def renew_lease(self, owner: str, ttl: float) -> None:
        """Record that process `owner` is alive for the next `ttl` seconds."""

    async def lease_alive(self, owner: str) -> bool:
        """Whether the last lease of `owner` has not run out."""

    async def aclose(self) -> None:
        """Release connections and files; the tracker calls it at shutdown.

        Calling it twice is harmless, and a store used again afterwards opens
        what it needs again (a tracker may start again after shutdown)."""


@runtime_checkable
class ConsoleStore(TaskStore, Protocol):
    """A `TaskStore` that also serves the console: `TaskTracker.list`,
    `stats`, and `cancel` of another process's tasks. The stores of this
    package all are; a store that is only a `TaskStore` still tracks and
    serves lookups, and the console says what it lacks.
    """

    async def query(
        self,
        *,
        statuses: Collection[str] | None = None,
        name: str | None = None,
        since: float | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[Record]:
        """Up to `limit` unexpired records, newest first: ordered by
        ``(created_of(record), task_id)``, descending. Only those whose status
        is in `statuses` (stored statuses: pending, running, done, failed,
        cancelled), whose name is `name`, created at or after `since`
        (seconds since the epoch), and ordered strictly after `before` (the
        key of the last record of the previous page). A page costs O(limit),
        not O(records held): keep indexes by time, status and name."""

    async def request_cancel(self, owner: str, task_id: str, reason: str) -> None:
        """Ask process `owner` to cancel its task `task_id`, saying `reason`
        (it reads its requests with `cancel_requests` every `FLUSH_INTERVAL`)."""

    async def cancel_requests(self, owner: str) -> list[tuple[str, str]]:
        """Take the ``(task_id, reason)`` requests made of `owner`, in the
        order made: each is returned once."""


class MemoryStore:
    """A `TaskStore` in this process's memory: for tests, and as the
    reference implementation of the protocol. Processes do not share it.

    Parameters:
        clock: Seconds, for expiry (`time.monotonic` by default).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, tuple[Record, float]] = {}
        self._leases: dict[str, float] = {}
        self._cancels: dict[str, list[tuple[str, str]]] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._records)} record(s)>"

    @property
    def records(self) -> dict[str, Record]:
        """What it holds, by task id (expired records included): for tests."""
        return {task_id: dict(record) for task_id, (record, _) in self._records.items()}

    @property
    def leases(self) -> dict[str, float]:
        """When each owner's lease runs out, on its clock: for tests."""
        return dict(self._leases)

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        expires_at = math.inf if history_ttl is None else self._clock() + history_ttl
        for record in records:
            finished = record["status"] in FINISHED
            self._records[record["task_id"]] = (dict(record), expires_at if finished else math.inf)

    async def get(self, task_id: str) -> Record | None:
        entry = self._records.get(task_id)
        if entry is None:
            return None
        record, expires_at = entry
        if expires_at <= self._clock():
            del self._records[task_id]
            return None
        return dict(record)

    async def renew_lease(self, owner: str, ttl: float) -> None:
        self._leases[owner] = self._clock() + ttl

    async def lease_alive(self, owner: str) -> bool:
        return self._leases.get(owner, -math.inf) > self._clock()

    async def aclose(self) -> None:
        pass

    async def query(
        self,
        *,
        statuses: Collection[str] | None = None,
        name: str | None = None,
        since: float | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[Record]:
        # The reference implementation: a scan of everything held.
        now = self._clock()
        matches = []
        for record, expires_at in self._records.values():
            key = (created_of(record), record["task_id"])
            if (
                expires_at > now
                and (statuses is None or record["status"] in statuses)
                and (name is None or record["name"] == name)
                and (since is None or key[0] >= since)
                and (before is None or key < before)
            ):
                matches.append((key, record))
        newest = heapq.nlargest(limit, matches, key=lambda match: match[0])
        return [dict(record) for _, record in newest]

    async def request_cancel(self, owner: str, task_id: str, reason: str) -> None:
        self._cancels.setdefault(owner, []).append((task_id, reason))

    async def cancel_requests(self, owner: str) -> list[tuple[str, str]]:
        return self._cancels.pop(owner, [])


def new_owner() -> str:
    """A lease id for this process: its pid, for people reading the store, and
    64 random bits, so a restarted process (or a reused pid) never inherits it."""
    return f"{os.getpid()}-{os.urandom(8).hex()}"


class StoreWriter(TaskObserver):
    """The `TaskObserver` that writes the tracked tasks' records to a store.

    Transitions only file the task's handle under its id (a later transition
    of the same task replaces the earlier: records coalesce); `run()` writes
    the buffer every `interval` seconds, from the tracker's lifespan, and
    renews this process's lease every ``lease_ttl / 3`` seconds, and at once
    when the store answers again after failing. Between two renewals it asks
    the store whether the lease is still there: a store that lost it (Redis
    restarted without persistence) gets it back, with the records of the
    unfinished tasks, within one `interval`, so a running task never reads
    ``lost`` for long because the store restarted.

    With a store that has ``cancel_requests``, each write also takes the
    cancellations other processes asked of this one, and passes each
    ``(task_id, reason)`` to `on_cancel`.

    While the store fails or is slow, the records stay buffered and are
    retried at the next write. Past `max_buffered` records, the oldest
    finished ones are dropped, in constant time (their last status is then
    never written); if none has finished, the oldest of all go. A WARNING
    says so at most once per `warn_every` seconds: how many records wait,
    how many were dropped and since when.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        lease_ttl: float,
        history_ttl: float | None,
        interval: float = FLUSH_INTERVAL,
        max_buffered: int = MAX_BUFFERED,
        warn_every: float = WARN_EVERY,
        clock: Callable[[], float] = time.monotonic,
        expose_errors: bool = False,
        on_cancel: Callable[[str, str], object] | None = None,
    ) -> None:
        self.store = store
        self.owner = new_owner()
        self.lease_ttl = lease_ttl
        self.history_ttl = history_ttl
        # A lease shorter than three intervals would lapse between renewals.
        self.interval = min(interval, lease_ttl / 3)
        self.max_buffered = max_buffered
        self.warn_every = warn_every
        self.expose_errors = expose_errors
        self.on_cancel = on_cancel
        self._clock = clock
        # Filed handles, by id, oldest first: the finished apart, so that the
        # one to drop is always at the front of one of them.
        self._unfinished: OrderedDict[str, TaskHandle] = OrderedDict()
        self._finished: OrderedDict[str, TaskHandle] = OrderedDict()
        self._live: dict[str, TaskHandle] = {}  # every unfinished task filed, to write again
        self._lease_due = -math.inf
        self._next_warning = -math.inf
        self._failing = False
        self._dropped = 0
        self._dropped_since: float | None = None  # wall clock of the first drop unreported

    # TaskObserver: on the event loop, for every transition; no I/O here.

    def task_queued(self, handle: TaskHandle, tasks: Cancellable) -> None:
        self._file(handle)

    def task_started(self, handle: TaskHandle) -> None:
        self._file(handle)

    def task_ended(self, handle: TaskHandle) -> None:
        self._file(handle)

    def task_handed_off(self, handle: TaskHandle) -> None:
        # Its record is written where it runs now (taskiq's middleware): a
        # `pending` of ours, written later, would hide that one's progress.
        self._unfinished.pop(handle.task_id, None)
        self._live.pop(handle.task_id, None)

    def _file(self, handle: TaskHandle) -> None:
        task_id = handle.task_id
        self._unfinished.pop(task_id, None)
        if handle.finished:
            self._finished[task_id] = handle
            self._live.pop(task_id, None)
        else:
            self._unfinished[task_id] = handle
            self._live[task_id] = handle
        if self.buffered > self.max_buffered:
            self._drop_one()

    def _drop_one(self) -> None:
        (self._finished or self._unfinished).popitem(last=False)
        self._dropped += 1
        if self._dropped_since is None:
            self._dropped_since = time.time()
        self._warn("the store is slower than the tasks")

    @property
    def buffered(self) -> int:
        """Records waiting to be written."""
        return len(self._unfinished) + len(self._finished)

    def unwritten(self) -> list[TaskHandle]:
        """The handles whose records wait to be written (the store lags behind them)."""
        return [*self._unfinished.values(), *self._finished.values()]

    # The loop, in the tracker's lifespan task group.

    async def start(self) -> None:
        """Take this process's lease; raises what the store raises."""
        await self.store.renew_lease(self.owner, self.lease_ttl)
        self._lease_due = self._clock() + self.lease_ttl / 3

    async def run(self) -> None:
        """Write the buffer every `interval` seconds, until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> bool:
        """Renew the lease if due and write the buffer; never raises an
        `Exception`. Returns whether everything was written."""
        try:
            if self._clock() < self._lease_due and not await self.store.lease_alive(self.owner):
                logger.warning(
                    "The task store %r had lost this process's lease (restarted without"
                    " persistence?); renewing it and writing %d unfinished record(s) again",
                    self.store,
                    len(self._live),
                )
                for handle in list(self._live.values()):
                    self._file(handle)
                self._lease_due = -math.inf
            if self._clock() >= self._lease_due:
                await self.store.renew_lease(self.owner, self.lease_ttl)
                self._lease_due = self._clock() + self.lease_ttl / 3
            await self._write()
            if self.on_cancel is not None and isinstance(self.store, ConsoleStore):
                for task_id, reason in await self.store.cancel_requests(self.owner):
                    self.on_cancel(task_id, reason)
        except Exception as exc:
            self._failing = True
            self._lease_due = -math.inf  # renewed first thing once it answers
            self._warn(f"it failed ({type(exc).__name__}: {exc})")
            return False
        if self._failing:
            self._failing = False
            logger.info("The task store %r works again; statuses flow again", self.store)
        return True

    async def _write(self) -> None:
        if not self.buffered:
            return
        batch = [*self._unfinished.values(), *self._finished.values()]
        self._unfinished = OrderedDict()
        self._finished = OrderedDict()
        owner = self.owner
        expose = self.expose_errors
        records = [{**record_of(handle, expose), "owner": owner} for handle in batch]
        try:
            await self.store.put(records, history_ttl=self.history_ttl)
        except BaseException:
            # Keep them for the next try, in their order; a transition filed
            # meanwhile is newer, and takes its task's place.
            filed = {**self._unfinished, **self._finished}
            self._unfinished = OrderedDict()
            self._finished = OrderedDict()
            for handle in batch:
                self._file(filed.pop(handle.task_id, handle))
            for handle in filed.values():
                self._file(handle)
            raise

    def _warn(self, why: str) -> None:
        now = self._clock()
        if now < self._next_warning:
            return
        self._next_warning = now + self.warn_every
        dropped, self._dropped = self._dropped, 0
        since, self._dropped_since = self._dropped_since, None
        lost = ""
        if dropped:
            when = time.strftime("%H:%M:%S", time.localtime(since))
            lost = f", and {dropped} dropped from the full buffer since {when}"
        logger.warning(
            "The task store %r is behind: %s; %d record(s) wait to be written%s."
            " Retrying every %s s; next warning in %s s at the earliest. Tasks run as usual.",
            self.store,
            why,
            self.buffered,
            lost,
            self.interval,
            self.warn_every,
        )

    async def close(self, grace: float) -> None:
        """At shutdown, after the drain: write what remains (and close the
        store) within `grace` seconds each; say what could not be written."""
        with anyio.move_on_after(grace):
            await self.flush()
        if self.buffered:
            logger.warning(
                "%d task record(s) could not be written to the task store %r at shutdown",
                self.buffered,
                self.store,
            )
        with anyio.move_on_after(grace):
            try:
                await self.store.aclose()
            except Exception as exc:
                logger.warning("Closing the task store %r failed: %r", self.store, exc)
