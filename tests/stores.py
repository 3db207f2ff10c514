"""The stores the contract suite (`tests/test_store_contract.py`) runs against.

`store` is a parametrized fixture (re-exported by `tests/conftest.py`): one
fresh, empty store per test for each name in `STORES`. To run the suite
against your own `TaskStore`, add a factory for it here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fastapi_bgplus import MemoryStore, SQLiteStore, TaskStore

StoreFactory = Callable[[Path], TaskStore]

STORES: dict[str, StoreFactory] = {
    "memory": lambda tmp_path: MemoryStore(),
    "sqlite": lambda tmp_path: SQLiteStore(tmp_path / "tasks.db"),
}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    """A new, empty store of each kind in `STORES`, closed after the test."""
    made = STORES[request.param](tmp_path)
    yield made
    await made.aclose()
