"""`ReclaimingRedisStreamBroker`: taskiq-redis's stream broker, recovering a
dead worker's messages without waiting for new ones.

taskiq-redis (up to 1.2.4, the latest) reclaims the messages a dead worker had
taken (running or prefetched, never acknowledged) only after a read that
returned new messages: on a quiet stream they wait until the next task is sent,
which after a crash at night may be hours. Its reclaim lock also has no timeout
by default, so a worker killed while holding it stops every reclaim for good.
Upstream: taskiq-redis issue #131 and pull request #129. This subclass changes
those two things and nothing else; remove it (use `taskiq_redis.RedisStreamBroker`
again) once upstream reclaims on idle reads.

Needs the ``taskiq`` extra and ``taskiq-redis``::

    from fastapi_bgplus.taskiq_redis import ReclaimingRedisStreamBroker

    broker = ReclaimingRedisStreamBroker(
        "redis://localhost:6379/0",
        idle_timeout=60_000,  # ms: longer than your longest task
    ).with_middlewares(TrackingMiddleware(store))
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from taskiq import AckableMessage
from taskiq_redis import RedisStreamBroker

__all__ = ["DEFAULT_LOCK_TIMEOUT", "ReclaimingRedisStreamBroker"]

DEFAULT_LOCK_TIMEOUT = 10.0
"""Seconds the reclaim lock lasts when `unacknowledged_lock_timeout` is not given."""


class ReclaimingRedisStreamBroker(RedisStreamBroker):
    """`taskiq_redis.RedisStreamBroker`, with a dead worker's messages reclaimed
    even when no new message arrives.

    After every read of the stream, whether it returned messages or timed out
    after `xread_block` ms, the worker claims the messages other consumers
    left unacknowledged for `idle_timeout` ms (``XAUTOCLAIM``) and runs them.
    So after a worker dies, each task it had taken runs again within about
    ``idle_timeout + xread_block`` ms, on a quiet stream too, whichever
    surviving worker claims it first (at least once: a task cut mid-run runs
    again). `idle_timeout` must exceed your longest task, or a task still
    running is claimed and run a second time (upstream's rule as well).

    The reclaim lock lasts `unacknowledged_lock_timeout` seconds
    (`DEFAULT_LOCK_TIMEOUT` when not given, where upstream's never expires).
    Every other argument is `RedisStreamBroker`'s.
    """

    def __init__(
        self, url: str, *, unacknowledged_lock_timeout: float | None = None, **kwargs: Any
    ) -> None:
        if unacknowledged_lock_timeout is None:
            unacknowledged_lock_timeout = DEFAULT_LOCK_TIMEOUT
        super().__init__(url, unacknowledged_lock_timeout=unacknowledged_lock_timeout, **kwargs)

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """New messages, then the idle ones of other consumers, read after read."""
        streams = {self.queue_name: ">", **self.additional_streams}
        async with Redis(connection_pool=self.connection_pool) as redis:
            while True:
                fetched = await self._read(redis, streams)
                for stream, messages in fetched or ():
                    for message_id, message in messages:
                        yield self._ackable(stream, message_id, message)
                for stream in streams:
                    for message_id, message in await self._claim_idle(redis, stream):
                        yield self._ackable(stream, message_id, message)

    async def _read(self, redis: Redis, streams: dict[str, Any]) -> Any:
        """One read of the streams, in a task of its own, so that a
        cancellation (taskiq's worker cancels the read at shutdown) always
        reaches this generator: awaited directly, redis-py can lose one that
        lands as the blocking read returns, and the worker then reads for
        ever, deaf to SIGTERM. Cancelled, the read is told to stop too; what it
        may still fetch stays unacknowledged, for another worker to claim."""
        read = asyncio.ensure_future(
            redis.xreadgroup(
                self.consumer_group_name,
                self.consumer_name,
                streams,  # type: ignore[arg-type]
                block=self.block,
                noack=False,
                count=self.count,
            )
        )
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            read.cancel()
            read.add_done_callback(_retrieve)
            raise

    async def _claim_idle(self, redis: Redis, stream: str) -> list[Any]:
        """The messages of `stream` left unacknowledged for `idle_timeout`,
        claimed for this consumer, under the group's reclaim lock."""
        lock = redis.lock(
            f"autoclaim:{self.consumer_group_name}:{stream}",
            timeout=self.unacknowledged_lock_timeout,
        )
        async with lock:
            _, claimed, *_ = await redis.xautoclaim(
                name=stream,
                groupname=self.consumer_group_name,
                consumername=self.consumer_name,
                min_idle_time=self.idle_timeout,
                count=self.unacknowledged_batch_size,
            )
        return list(claimed)

    def _ackable(self, stream: Any, message_id: Any, message: Any) -> AckableMessage:
        return AckableMessage(
            data=message[b"data"],
            ack=self._ack_generator(id=message_id, queue_name=stream),
        )


def _retrieve(read: asyncio.Future[Any]) -> None:
    """Take the outcome of a read nobody awaits any more (no "never retrieved" log)."""
    read.cancelled() or read.exception()
