"""The stores the contract suite (`tests/test_store_contract.py`) runs against.

`store` is a parametrized fixture (re-exported by `tests/conftest.py`): one
fresh, empty store per test for each name in `STORES`. To run the suite
against your own `TaskStore`, add a factory for it here. A factory gets the
test's `pytest.FixtureRequest`, so it can ask for other fixtures (a server, a
temporary directory) with ``request.getfixturevalue(name)``, or skip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fastapi_bgplus import MemoryStore, SQLiteStore, TaskStore

StoreFactory = Callable[[pytest.FixtureRequest], TaskStore]


def sqlite_store(request: pytest.FixtureRequest) -> TaskStore:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return SQLiteStore(tmp_path / "tasks.db")


STORES: dict[str, StoreFactory] = {
    "memory": lambda request: MemoryStore(),
    "sqlite": sqlite_store,
}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TaskStore]:
    """A new, empty store of each kind in `STORES`, closed after the test."""
    made = STORES[request.param](request)
    yield made
    await made.aclose()
