"""A task store in Redis, for the taskiq example: the web app and the worker
write and read task status there.

RECONCILE (lead): a stand-in written on branch `taskiq` while branch `store`
builds the real one. Once it lands, delete this file and write, in
examples/taskiq_worker.py, ``store = RedisStore(REDIS_URL)``, and in
examples/taskiq_app.py, ``TaskTracker(store=store)`` with
``app.include_router(tracker.router(prefix="/tasks"))`` in place of the route
that calls `lookup`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from fastapi_bgplus import TaskTracker

Record = dict[str, Any]

UNFINISHED = ("pending", "running")


class RedisStatusStore:
    """The `TaskStore` protocol over Redis: one JSON value per task, one key per lease."""

    def __init__(self, url: str, prefix: str = "bgplus") -> None:
        self.redis = Redis.from_url(url)
        self.prefix = prefix

    def key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                finished = record["status"] not in UNFINISHED
                expiry = int(history_ttl * 1000) if finished and history_ttl else None
                pipe.set(self.key(record["task_id"]), json.dumps(record), px=expiry)
            await pipe.execute()

    async def get(self, task_id: str) -> Record | None:
        raw = await self.redis.get(self.key(task_id))
        return json.loads(raw) if raw is not None else None

    async def renew_lease(self, owner: str, ttl: float) -> None:
        await self.redis.set(f"{self.prefix}:lease:{owner}", b"1", px=int(ttl * 1000))

    async def lease_alive(self, owner: str) -> bool:
        return bool(await self.redis.exists(f"{self.prefix}:lease:{owner}"))

    async def aclose(self) -> None:
        await self.redis.aclose()


async def lookup(tracker: TaskTracker, store: RedisStatusStore, task_id: str) -> Record | None:
    """This process's task first, then the store's record; what
    ``await tracker.lookup(task_id)`` answers once the store branch lands."""
    handle = tracker.get(task_id)
    if handle is not None:
        return handle.to_dict()
    record = await store.get(task_id)
    if record is None:
        return None
    owner = record.pop("owner")
    if record["status"] in UNFINISHED and not await store.lease_alive(owner):
        record["status"] = "lost"
    return record
