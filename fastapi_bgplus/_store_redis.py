"""`RedisStore`: the task store for workers on several hosts, on a Redis server.

Imported only through `fastapi_bgplus.RedisStore` (lazily), so that
``import fastapi_bgplus`` never imports `redis`. It implements the
`TaskStore` protocol (see `fastapi_bgplus._store`).

Keys, under the prefix: ``{prefix}task:{task_id}`` holds a record as JSON and
``{prefix}lease:{owner}`` marks a live process; expiry is Redis's own (``PX``).
For the console's `query`, sorted sets of task ids scored by creation time:
``{prefix}by:all``, ``{prefix}by:status:{status}`` and
``{prefix}by:name:{status}:{name}``; ``{prefix}expiry`` scores each task by
when its record expires, so that a writer removes expired ids from the
indexes (every `PURGE_EVERY_S`). ``{prefix}cancel:{owner}`` lists the
cancellations asked of a process.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Collection, Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._store import FINISHED, STORED, created_of

__all__ = ["UNFINISHED_EXPIRY_S", "RedisStore"]

Record = dict[str, Any]

UNFINISHED_EXPIRY_S = 7 * 24 * 3600
"""A safety expiry for pending and running records (7 days). Their process's
lease says whether they are still alive; this only bounds what a crashed
process leaves in Redis."""

# For a client built from a URL. Status writes are retried by the tracker, and a
# lookup should rather fail soon than hang a request: give up on a silent server
# after 2 seconds, without retrying, but retry a broken connection once at once
# (a pooled connection that a server restart broke is replaced on the retry).
# URL query options take precedence over the timeouts.
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 2.0

DEFAULT_MAX_CONNECTIONS = 50
"""Connections a `RedisStore` built from a URL opens at most, per process."""

POOL_TIMEOUT_S = 5.0
"""Seconds a call waits for a free connection once all of them are busy."""

PURGE_EVERY_S = 60.0
"""Seconds between two removals of expired task ids from the query indexes."""

PURGE_BATCH = 10_000
"""Expired ids removed from the indexes at most per purge."""


def _millis(seconds: float) -> int:
    # PX takes whole milliseconds, and at least one.
    return max(1, math.ceil(seconds * 1000))


class RedisStore:
    """A task store on a Redis server, for several processes on several hosts.

    ``RedisStore("redis://localhost:6379/0")`` or ``RedisStore(client)``.

    `url_or_client` is a URL, as `redis.asyncio.from_url` reads it:
    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS,
    ``unix:///path/to/redis.sock[?db=0]``; options such as
    ``?socket_timeout=5`` go in the query string. Built from a URL, the client
    times out after 2 seconds and retries a failed command once, and
    `aclose` closes it. Its connections come from a blocking pool of
    `max_connections`: a call made while all are busy waits for one (up to
    `POOL_TIMEOUT_S`) rather than failing, so hundreds of concurrent lookups
    are served. Or pass a `redis.asyncio.Redis` client of your own: it is used
    as it is configured, and `aclose` leaves it open (close it yourself);
    redis-py's default pool raises `MaxConnectionsError` past its size
    instead of waiting.

    Every key starts with `prefix`, so several applications can share a
    database: stores with different prefixes never see each other's tasks.

    Needs the `redis` extra (``pip install "fastapi-bgplus[redis]"``) and
    asyncio: redis-py's asyncio client runs on an asyncio event loop only, so
    under trio every method raises `RuntimeError`. Methods raise
    `redis.exceptions.RedisError` (such as `ConnectionError`) when the server
    cannot be reached; the tracker's writer catches, logs and retries.
    """

    __slots__ = (
        "_client",
        "_lease_prefix",
        "_next_purge",
        "_owns_client",
        "_task_prefix",
        "prefix",
    )

    def __init__(
        self,
        url_or_client: str | redis.asyncio.Redis,
        *,
        prefix: str = "fastapi_bgplus:",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if isinstance(url_or_client, str):
            if not (
                isinstance(max_connections, int)
                and not isinstance(max_connections, bool)
                and max_connections >= 1
            ):
                raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url_or_client,
                max_connections=max_connections,
                timeout=POOL_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
                # redis-py < 6 retries only the errors listed here as well.
                retry_on_error=[redis.exceptions.ConnectionError],
            )
            self._client: redis.asyncio.Redis = redis.asyncio.Redis(connection_pool=pool)
            self._owns_client = True
        elif isinstance(url_or_client, redis.asyncio.Redis):
            self._client = url_or_client
            self._owns_client = False
        else:
            raise TypeError(
                "RedisStore() takes a Redis URL such as 'redis://localhost:6379/0' or a "
                f"redis.asyncio.Redis client, not {type(url_or_client).__name__}; for the "
                "synchronous redis.Redis, build redis.asyncio.Redis with the same options"
            )
        self.prefix = prefix
        self._task_prefix = f"{prefix}task:"
        self._lease_prefix = f"{prefix}lease:"
        self._next_purge = 0.0

    def __repr__(self) -> str:
        # Not the client's repr: it may show a password from the URL.
        return f"<RedisStore prefix={self.prefix!r}>"

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        """Write `records` in one round trip, in order: a later record of a task wins.

        A finished record (done, failed, cancelled) expires `history_ttl`
        seconds after it is written, never if None. A pending or running record
        expires after `UNFINISHED_EXPIRY_S` (7 days) in any case.
        """
        _require_asyncio()
        if not records:
            return
        now = time.time()
        async with self._client.pipeline(transaction=False) as pipe:
            for record in records:
                task_id, status, name = record["task_id"], record["status"], record["name"]
                key = self._task_prefix + task_id
                value = json.dumps(record, separators=(",", ":"))
                if status not in FINISHED:
                    pipe.set(key, value, ex=UNFINISHED_EXPIRY_S)
                    expires_at = now + UNFINISHED_EXPIRY_S
                elif history_ttl is None:
                    pipe.set(key, value)
                    expires_at = math.inf
                elif history_ttl > 0:
                    pipe.set(key, value, px=_millis(history_ttl))
                    expires_at = now + history_ttl
                else:  # already past its history: what it replaces goes too
                    pipe.delete(key)
                    expires_at = now
                created = {task_id: created_of(record)}
                pipe.zadd(self._index("all"), created)
                for other in STORED:
                    if other == status:
                        pipe.zadd(self._index("status", other), created)
                        pipe.zadd(self._index("name", other, name), created)
                    else:
                        pipe.zrem(self._index("status", other), task_id)
                        pipe.zrem(self._index("name", other, name), task_id)
                pipe.zadd(self.prefix + "expiry", {task_id + name: expires_at})
            await pipe.execute()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY_S
            await self._purge(now)

    def _index(self, *parts: str) -> str:
        return f"{self.prefix}by:{':'.join(parts)}"

    async def _purge(self, now: float) -> None:
        """Remove the ids of expired records from the query indexes."""
        expiry = self.prefix + "expiry"
        members = await self._client.zrangebyscore(expiry, "-inf", now, start=0, num=PURGE_BATCH)
        if not members:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for member in members:
                text = _text(member)
                task_id, name = text[:32], text[32:]  # ids are 32 characters
                pipe.zrem(self._index("all"), task_id)
                for status in STORED:
                    pipe.zrem(self._index("status", status), task_id)
                    pipe.zrem(self._index("name", status, name), task_id)
            pipe.zrem(expiry, *members)
            await pipe.execute()

    async def get(self, task_id: str) -> Record | None:
        """The last record written for `task_id`, or None if there is none (or it expired)."""
        _require_asyncio()
        value = await self._client.get(self._task_prefix + task_id)
        if value is None:
            return None
        record: Record = json.loads(value)
        return record

    async def renew_lease(self, owner: str, ttl: float) -> None:
        """Record that process `owner` is alive for the next `ttl` seconds."""
        _require_asyncio()
        key = self._lease_prefix + owner
        if ttl > 0:
            await self._client.set(key, b"1", px=_millis(ttl))
        else:
            await self._client.delete(key)

    async def lease_alive(self, owner: str) -> bool:
        """Whether process `owner` renewed its lease and the lease has not lapsed."""
        _require_asyncio()
        return bool(await self._client.exists(self._lease_prefix + owner))

    async def query(
        self,
        *,
        statuses: Collection[str] | None = None,
        name: str | None = None,
        since: float | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[Record]:
        """Up to `limit` records, newest first, from the sorted-set indexes:
        one read of about `limit` ids per status asked for, then the records
        of the newest `limit` in one round trip."""
        _require_asyncio()
        if statuses is None and name is None:
            keys = [self._index("all")]
        else:
            wanted = [status for status in STORED if statuses is None or status in statuses]
            if name is None:
                keys = [self._index("status", status) for status in wanted]
            else:
                keys = [self._index("name", status, name) for status in wanted]
        records: list[Record] = []
        while len(records) < limit:
            found: list[tuple[float, str]] = []
            for key in keys:
                found += await self._newest(key, since, before, limit)
            found = sorted(found, reverse=True)[:limit]
            if not found:
                break
            values = await self._client.mget([self._task_prefix + task_id for _, task_id in found])
            # An id whose record has expired (not purged from the indexes
            # yet), or whose status changed meanwhile, is skipped.
            for value in values:
                record: Record | None = None if value is None else json.loads(value)
                if (
                    record is not None
                    and (statuses is None or record["status"] in statuses)
                    and (name is None or record["name"] == name)
                ):
                    records.append(record)
            if len(found) < limit:
                break
            before = found[-1]
        return records[:limit]

    async def _newest(
        self, key: str, since: float | None, before: tuple[float, str] | None, limit: int
    ) -> list[tuple[float, str]]:
        """The newest `limit` (score, id) of the index `key`, ordered before `before`."""
        high: float | str = "+inf" if before is None else before[0]
        low: float | str = "-inf" if since is None else since
        ids: list[tuple[float, str]] = []
        offset = 0
        while True:
            batch: list[Any] = await self._client.zrevrangebyscore(
                key, high, low, start=offset, num=limit + 1, withscores=True
            )
            for member, score in batch:
                entry = (float(score), _text(member))
                if before is None or entry < before:  # ties on the score go by id
                    ids.append(entry)
            offset += len(batch)
            if len(ids) >= limit or len(batch) <= limit:
                return ids[:limit]

    async def request_cancel(self, owner: str, task_id: str, reason: str) -> None:
        """Ask process `owner` to cancel `task_id`, saying `reason`."""
        _require_asyncio()
        key = f"{self.prefix}cancel:{owner}"
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps([task_id, reason]))
            pipe.expire(key, 3600)  # never read by a process that died: gone within the hour
            await pipe.execute()

    async def cancel_requests(self, owner: str) -> list[tuple[str, str]]:
        """Take the ``(task_id, reason)`` requests made of `owner`, in order."""
        _require_asyncio()
        key = f"{self.prefix}cancel:{owner}"
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            requests, _ = await pipe.execute()
        return [(task_id, reason) for task_id, reason in map(json.loads, requests)]

    async def aclose(self) -> None:
        """Close the client if this store built it from a URL; a client passed in stays open."""
        if self._owns_client:
            await self._client.aclose(close_connection_pool=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "RedisStore runs on asyncio only: redis-py's asyncio client needs an asyncio "
            "event loop, and this code runs on another one, such as trio. Run the app on "
            "asyncio (uvicorn, or hypercorn --worker-class asyncio), or use SQLiteStore, "
            "which works on both"
        ) from None
