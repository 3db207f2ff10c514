"""The task store protocol, and a store in memory.

RECONCILE (lead): a minimal stand-in written on branch `taskiq`, holding only
the protocol agreed with branch `store` and a `MemoryStore`; the `store`
branch's module replaces this file whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["MemoryStore", "Record", "TaskStore"]

Record = dict[str, Any]
"""`TaskHandle.to_dict()` plus ``"owner"``: the lease id of the process that wrote it."""


class TaskStore(Protocol):
    """Where the processes sharing it write their tasks' records and read each other's."""

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        """Upsert `records` by task id, in order; finished ones expire after `history_ttl`."""

    async def get(self, task_id: str) -> Record | None:
        """The record of this task, or `None`."""

    async def renew_lease(self, owner: str, ttl: float) -> None:
        """Keep the lease of process `owner` alive for `ttl` more seconds."""

    async def lease_alive(self, owner: str) -> bool:
        """Whether process `owner` renewed its lease less than its ttl ago."""

    async def aclose(self) -> None:
        """Release the store's resources."""


class MemoryStore:
    """A `TaskStore` in this process's memory (tests, one process)."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.leases: dict[str, float] = {}

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        for record in records:
            self.records[record["task_id"]] = dict(record)

    async def get(self, task_id: str) -> Record | None:
        record = self.records.get(task_id)
        return dict(record) if record is not None else None

    async def renew_lease(self, owner: str, ttl: float) -> None:
        self.leases[owner] = time.monotonic() + ttl

    async def lease_alive(self, owner: str) -> bool:
        return self.leases.get(owner, 0.0) > time.monotonic()

    async def aclose(self) -> None:
        pass
