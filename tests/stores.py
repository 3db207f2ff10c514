"""The stores the contract suite (`tests/test_store_contract.py`) runs against.

`store` is a parametrized fixture: for each entry of `STORES`, it is the
value of the named fixture, a fresh, empty store that the fixture closes
after the test. To run the suite against your own `TaskStore`, write such a
fixture (it may use others: a server, a temporary directory; or skip) and
add its name to `STORES`. `tests/conftest.py` re-exports these fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastapi_bgplus import MemoryStore, SQLiteStore, TaskStore

STORES = {
    "memory": "memory_store",
    "sqlite": "sqlite_store",
}
"""Store kind (the test id) → the name of the fixture that makes one."""


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> TaskStore:
    """A new, empty store of each kind in `STORES`."""
    made: TaskStore = request.getfixturevalue(STORES[request.param])
    return made


@pytest.fixture
async def memory_store() -> AsyncIterator[TaskStore]:
    store = MemoryStore()
    yield store
    await store.aclose()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[TaskStore]:
    store = SQLiteStore(tmp_path / "tasks.db")
    yield store
    await store.aclose()
