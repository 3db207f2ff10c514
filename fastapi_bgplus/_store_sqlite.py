"""`SQLiteStore`: a task store in one SQLite file, for the workers of one host."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._store import FINISHED, STORED, Record, created_of

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bgplus_tasks (
    task_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    expires_at REAL,
    created REAL,
    status TEXT,
    name TEXT
);
CREATE INDEX IF NOT EXISTS bgplus_tasks_expiry ON bgplus_tasks (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS bgplus_leases (
    owner TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bgplus_cancels (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    task_id TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS bgplus_cancels_owner ON bgplus_cancels (owner);
"""

# What `query` reads a page through: by time, by status and time, by name,
# status and time (a name alone is read status by status).
_INDEXES = """
CREATE INDEX IF NOT EXISTS bgplus_tasks_created ON bgplus_tasks (created, task_id);
CREATE INDEX IF NOT EXISTS bgplus_tasks_status ON bgplus_tasks (status, created, task_id);
CREATE INDEX IF NOT EXISTS bgplus_tasks_name ON bgplus_tasks (name, status, created, task_id);
"""

# A database written by fastapi-bgplus 0.2 has no query columns: they are
# added, and filled from the records.
_MIGRATION = """
ALTER TABLE bgplus_tasks ADD COLUMN created REAL;
ALTER TABLE bgplus_tasks ADD COLUMN status TEXT;
ALTER TABLE bgplus_tasks ADD COLUMN name TEXT;
UPDATE bgplus_tasks SET
    created = (julianday(json_extract(record, '$.created_at')) - 2440587.5) * 86400.0,
    status = json_extract(record, '$.status'),
    name = json_extract(record, '$.name');
"""


class SQLiteStore:
    """A `TaskStore` in an SQLite database file, shared by the worker
    processes of one host (``uvicorn --workers N``, gunicorn).

    Standard library only. The database runs in WAL mode, so readers never
    wait for writers; each process holds two connections, one that writes and
    one that reads (so a lookup never queues behind a write waiting for a
    lock), each used from one worker thread at a time: never on the event
    loop, never on the thread limiter of endpoints or tasks. Expired records
    and leases are purged every `purge_every` seconds. Expiry uses the host's
    wall clock.

    Parameters:
        path: The database file; created with its tables if missing. Its
            directory must exist and be writable by every worker's user:
            SQLite writes ``-wal`` and ``-shm`` files beside it. Not on a
            network file system (NFS, SMB): SQLite's locks do not hold there.
        busy_timeout: Seconds a write waits for another process's write.
        purge_every: Seconds between two purges of expired rows.

    Nothing is opened until the first use. An unusable path raises `OSError`
    then, which at startup stops the application (see `TaskTracker`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        purge_every: float = 60.0,
    ) -> None:
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self.purge_every = purge_every
        # Per role ("write", "read"): one connection, and a limiter of one
        # thread so that it is never used by two threads at once.
        self._connections: dict[str, sqlite3.Connection] = {}
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._next_purge = 0.0

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    async def _call(self, role: str, func: Callable[..., T], *args: object) -> T:
        limiter = self._limiters.get(role)
        if limiter is None:
            limiter = self._limiters[role] = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(func, role, *args, limiter=limiter)

    def _connect(self, role: str) -> sqlite3.Connection:
        connection = self._connections.get(role)
        if connection is not None:
            return connection
        connection = None
        try:
            connection = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # transactions are explicit
                check_same_thread=False,  # used by one thread at a time, not always the same
            )
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.executescript(_SCHEMA)
            _migrate(connection)
            connection.executescript(_INDEXES)
        except sqlite3.Error as exc:
            if connection is not None:
                connection.close()
            raise OSError(
                f"SQLiteStore cannot use the database file {self.path!r}: {exc}. Check that"
                f" its directory exists and that this process's user may create and write"
                f" files in it (SQLite adds {os.path.basename(self.path)}-wal and -shm"
                f" beside it), or pass another path"
            ) from exc
        self._connections[role] = connection
        return connection

    def _put(self, role: str, records: Sequence[Record], history_ttl: float | None) -> None:
        connection = self._connect(role)
        now = time.time()
        expires_at = None if history_ttl is None else now + history_ttl
        rows = [
            (
                record["task_id"],
                json.dumps(record, separators=(",", ":")),
                expires_at if record["status"] in FINISHED else None,
                created_of(record),
                record["status"],
                record["name"],
            )
            for record in records
        ]
        # IMMEDIATE: take the write lock now (waiting up to busy_timeout),
        # not halfway through, where SQLite could only fail.
        connection.execute("BEGIN IMMEDIATE")
        with connection:  # commits, or rolls back on an error
            connection.executemany(
                "INSERT OR REPLACE INTO bgplus_tasks"
                " (task_id, record, expires_at, created, status, name)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if now >= self._next_purge:
                self._next_purge = now + self.purge_every
                connection.execute("DELETE FROM bgplus_tasks WHERE expires_at <= ?", (now,))
                connection.execute("DELETE FROM bgplus_leases WHERE expires_at <= ?", (now,))

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        await self._call("write", self._put, records, history_ttl)

    def _get(self, role: str, task_id: str) -> Record | None:
        row = (
            self._connect(role)
            .execute("SELECT record, expires_at FROM bgplus_tasks WHERE task_id = ?", (task_id,))
            .fetchone()
        )
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        record: Record = json.loads(row[0])
        return record

    async def get(self, task_id: str) -> Record | None:
        return await self._call("read", self._get, task_id)

    def _renew_lease(self, role: str, owner: str, ttl: float) -> None:
        self._connect(role).execute(
            "INSERT OR REPLACE INTO bgplus_leases (owner, expires_at) VALUES (?, ?)",
            (owner, time.time() + ttl),
        )

    async def renew_lease(self, owner: str, ttl: float) -> None:
        await self._call("write", self._renew_lease, owner, ttl)

    def _lease_alive(self, role: str, owner: str) -> bool:
        row = (
            self._connect(role)
            .execute("SELECT expires_at FROM bgplus_leases WHERE owner = ?", (owner,))
            .fetchone()
        )
        return row is not None and bool(row[0] > time.time())

    async def lease_alive(self, owner: str) -> bool:
        return await self._call("read", self._lease_alive, owner)

    def _query(
        self,
        role: str,
        statuses: Collection[str] | None,
        name: str | None,
        since: float | None,
        before: tuple[float, str] | None,
        limit: int,
    ) -> list[Record]:
        connection = self._connect(role)
        # One indexed read per status asked for, merged: each reads at most `limit` rows.
        groups: list[str | None] = [None]
        if statuses is not None or name is not None:
            groups = [status for status in STORED if statuses is None or status in statuses]
        rows: list[tuple[float, str, str]] = []
        for status in groups:
            where = ["(expires_at IS NULL OR expires_at > ?)"]
            params: list[Any] = [time.time()]
            if name is not None:
                where.append("name = ?")
                params.append(name)
            if status is not None:
                where.append("status = ?")
                params.append(status)
            if since is not None:
                where.append("created >= ?")
                params.append(since)
            if before is not None:
                where.append("(created, task_id) < (?, ?)")
                params.extend(before)
            params.append(limit)
            rows += connection.execute(
                f"SELECT created, task_id, record FROM bgplus_tasks WHERE {' AND '.join(where)}"
                " ORDER BY created DESC, task_id DESC LIMIT ?",
                params,
            ).fetchall()
        rows.sort(reverse=True)
        return [json.loads(record) for _, _, record in rows[:limit]]

    async def query(
        self,
        *,
        statuses: Collection[str] | None = None,
        name: str | None = None,
        since: float | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[Record]:
        return await self._call("read", self._query, statuses, name, since, before, limit)

    def _request_cancel(self, role: str, owner: str, task_id: str, reason: str) -> None:
        self._connect(role).execute(
            "INSERT INTO bgplus_cancels (owner, task_id, reason) VALUES (?, ?, ?)",
            (owner, task_id, reason),
        )

    async def request_cancel(self, owner: str, task_id: str, reason: str) -> None:
        await self._call("write", self._request_cancel, owner, task_id, reason)

    def _cancels_for(self, role: str, owner: str) -> list[tuple[int, str, str]]:
        return (
            self._connect(role)
            .execute(
                "SELECT id, task_id, reason FROM bgplus_cancels WHERE owner = ? ORDER BY id",
                (owner,),
            )
            .fetchall()
        )

    def _delete_cancels(self, role: str, rows: list[tuple[int, str, str]]) -> None:
        self._connect(role).executemany(
            "DELETE FROM bgplus_cancels WHERE id = ?", [(row_id,) for row_id, _, _ in rows]
        )

    async def cancel_requests(self, owner: str) -> list[tuple[str, str]]:
        # Read first: the common answer is none, and needs no write lock.
        rows = await self._call("read", self._cancels_for, owner)
        if rows:
            await self._call("write", self._delete_cancels, rows)
        return [(task_id, reason) for _, task_id, reason in rows]

    def _close(self, role: str) -> None:
        connection = self._connections.pop(role, None)
        if connection is not None:
            connection.close()

    async def aclose(self) -> None:
        for role in list(self._limiters):
            await self._call(role, self._close)
        self._limiters.clear()


def _migrate(connection: sqlite3.Connection) -> None:
    if _has_query_columns(connection):  # the common case: no write lock taken
        return
    connection.execute("BEGIN IMMEDIATE")
    with connection:
        # Another worker may have migrated it meanwhile.
        if not _has_query_columns(connection):  # pragma: no branch
            for statement in _MIGRATION.split(";"):
                if statement.strip():
                    connection.execute(statement)


def _has_query_columns(connection: sqlite3.Connection) -> bool:
    columns = {row[1] for row in connection.execute("PRAGMA table_info(bgplus_tasks)")}
    return "created" in columns
