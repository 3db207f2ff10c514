"""The stores the contract suite (`tests/test_store_contract.py`) runs against.

`store` is a parametrized fixture: for each entry of `STORES`, it is the
value of the named fixture, a fresh, empty store that the fixture closes
after the test. To run the suite against your own `ConsoleStore`, write such a
fixture (it may use others: a server, a temporary directory; or skip) and
add its name to `STORES`. `tests/conftest.py` re-exports these fixtures.

`redis_store` is a `RedisStore` on the session's real `redis-server`, with a
key prefix of its own per test. RedisStore runs on asyncio only (redis-py's
asyncio client), so under trio the fixture skips.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastapi_bgplus import ConsoleStore, MemoryStore, RedisStore, SQLiteStore
from tests.redis_server import RedisServer

STORES = {
    "memory": "memory_store",
    "redis": "redis_store",
    "sqlite": "sqlite_store",
}
"""Store kind (the test id) → the name of the fixture that makes one."""

ASYNCIO_ONLY = "RedisStore runs on asyncio only: redis-py's asyncio client needs an asyncio loop"


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> ConsoleStore:
    """A new, empty store of each kind in `STORES`."""
    made: ConsoleStore = request.getfixturevalue(STORES[request.param])
    return made


@pytest.fixture
async def memory_store() -> AsyncIterator[ConsoleStore]:
    store = MemoryStore()
    yield store
    await store.aclose()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[ConsoleStore]:
    store = SQLiteStore(tmp_path / "tasks.db")
    yield store
    await store.aclose()


@pytest.fixture
async def redis_store(redis_server: RedisServer, anyio_backend: str) -> AsyncIterator[RedisStore]:
    if anyio_backend != "asyncio":
        pytest.skip(ASYNCIO_ONLY)
    store = RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex}:")
    yield store
    await store.aclose()
