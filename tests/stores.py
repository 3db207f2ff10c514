"""Task store fixtures, for the contract suite that runs against every store.

`redis_store` is a `RedisStore` on the session's real `redis-server`, with a
key prefix of its own per test, closed after it. RedisStore runs on asyncio
only (redis-py's asyncio client), so under trio the fixture skips.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from fastapi_bgplus import RedisStore
from tests.redis_server import RedisServer

ASYNCIO_ONLY = "RedisStore runs on asyncio only: redis-py's asyncio client needs an asyncio loop"


@pytest.fixture
async def redis_store(redis_server: RedisServer, anyio_backend: str) -> AsyncIterator[RedisStore]:
    if anyio_backend != "asyncio":
        pytest.skip(ASYNCIO_ONLY)
    store = RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex}:")
    yield store
    await store.aclose()
