"""`RedisStore`: the task store for workers on several hosts, on a Redis server.

Imported only through `fastapi_bgplus.RedisStore` (lazily), so that
``import fastapi_bgplus`` never imports `redis`. It implements the task store
protocol::

    Record = dict[str, Any]  # TaskHandle.to_dict() plus "owner": the writer's lease id

    class TaskStore(Protocol):
        async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None: ...
        async def get(self, task_id: str) -> Record | None: ...
        async def renew_lease(self, owner: str, ttl: float) -> None: ...
        async def lease_alive(self, owner: str) -> bool: ...
        async def aclose(self) -> None: ...

Keys, under the prefix: ``{prefix}task:{task_id}`` holds a record as JSON and
``{prefix}lease:{owner}`` marks a live process. Expiry is Redis's own (``PX``),
so no process has to sweep.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._handle import FINISHED

FINISHED_STATUSES = frozenset(status.value for status in FINISHED)

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

    __slots__ = ("_client", "_lease_prefix", "_owns_client", "_task_prefix", "prefix")

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
        async with self._client.pipeline(transaction=False) as pipe:
            for record in records:
                key = self._task_prefix + record["task_id"]
                value = json.dumps(record, separators=(",", ":"))
                if record["status"] not in FINISHED_STATUSES:
                    pipe.set(key, value, ex=UNFINISHED_EXPIRY_S)
                elif history_ttl is None:
                    pipe.set(key, value)
                elif history_ttl > 0:
                    pipe.set(key, value, px=_millis(history_ttl))
                else:  # already past its history: what it replaces goes too
                    pipe.delete(key)
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

    async def aclose(self) -> None:
        """Close the client if this store built it from a URL; a client passed in stays open."""
        if self._owns_client:
            await self._client.aclose(close_connection_pool=True)


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
