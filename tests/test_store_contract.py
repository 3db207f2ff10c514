"""The `TaskStore` contract: every store passes this suite (`tests/stores.py`
lists them; add yours there to check it).

Expiry is measured on the real clock with short lifetimes and bounded
polling, since stores such as Redis keep time on the server.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastapi_bgplus import TaskStore

pytestmark = pytest.mark.anyio

TTL = 0.2
DEADLINE = 5.0


def record(task_id: str, status: str = "pending", **fields: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "name": "app.send_welcome_email",
        "status": status,
        "created_at": "2026-01-02T03:04:05.678901+00:00",
        "started_at": None,
        "finished_at": None,
        "duration_s": None,
        "error": None,
        "attempts": 0,
        "owner": "1234-00ff00ff00ff00ff",
        **fields,
    }


A = "a" * 32
B = "b" * 32
C = "c" * 32


async def until_gone(store: TaskStore, task_id: str) -> float:
    """Seconds until `task_id` is unknown, polling for a bounded time."""
    started = anyio.current_time()
    while await store.get(task_id) is not None:
        assert anyio.current_time() - started < DEADLINE, f"{task_id} never expired"
        await anyio.sleep(0.02)
    return anyio.current_time() - started


async def test_an_unknown_id_is_none(store: TaskStore) -> None:
    assert await store.get(A) is None


async def test_a_record_reads_back_as_written(store: TaskStore) -> None:
    written = record(
        A,
        "failed",
        started_at="2026-01-02T03:04:05.700000+00:00",
        finished_at="2026-01-02T03:04:06.700000+00:00",
        duration_s=1.0000001,
        error="TimeoutError",
        attempts=3,
    )
    await store.put([written, record(B)], history_ttl=None)
    assert await store.get(A) == written
    assert await store.get(B) == record(B)
    assert await store.get(C) is None


async def test_a_record_read_is_a_copy(store: TaskStore) -> None:
    await store.put([record(A)], history_ttl=None)
    read = await store.get(A)
    assert read is not None
    read["status"] = "lost"
    assert await store.get(A) == record(A)


async def test_a_later_record_of_the_same_id_wins(store: TaskStore) -> None:
    await store.put([record(A), record(A, "running", attempts=1)], history_ttl=None)
    assert await store.get(A) == record(A, "running", attempts=1)
    await store.put([record(A, "done", attempts=1), record(B)], history_ttl=None)
    assert await store.get(A) == record(A, "done", attempts=1)
    await store.put([], history_ttl=None)  # an empty batch is fine
    assert await store.get(B) == record(B)


async def test_finished_records_expire_and_unfinished_ones_stay(store: TaskStore) -> None:
    finished = {"done": A, "failed": B, "cancelled": C}
    live = {status: f"{status[0]}{'0' * 31}" for status in ("pending", "running")}
    await store.put(
        [record(task_id, status) for status, task_id in finished.items()]
        + [record(task_id, status) for status, task_id in live.items()],
        history_ttl=TTL,
    )
    assert await store.get(A) is not None
    for task_id in finished.values():
        await until_gone(store, task_id)
    for status, task_id in live.items():
        assert await store.get(task_id) == record(task_id, status)


async def test_expiry_counts_from_the_last_write(store: TaskStore) -> None:
    await store.put([record(A, "done")], history_ttl=TTL)
    await anyio.sleep(TTL / 2)
    await store.put([record(A, "done", attempts=2)], history_ttl=TTL)
    started = anyio.current_time()
    await until_gone(store, A)
    assert anyio.current_time() - started > TTL / 2


async def test_a_finished_record_replacing_a_live_one_starts_expiring(store: TaskStore) -> None:
    await store.put([record(A, "running")], history_ttl=TTL)
    await store.put([record(A, "done")], history_ttl=TTL)
    await until_gone(store, A)


async def test_without_history_ttl_finished_records_stay(store: TaskStore) -> None:
    await store.put([record(A, "done")], history_ttl=None)
    await store.put([record(B, "done")], history_ttl=TTL)
    await until_gone(store, B)
    assert await store.get(A) == record(A, "done")


async def test_a_lease_lives_for_its_ttl_and_renewing_extends_it(store: TaskStore) -> None:
    assert not await store.lease_alive("never-seen")
    await store.renew_lease("one", TTL)
    await store.renew_lease("two", 60.0)
    assert await store.lease_alive("one")
    started = anyio.current_time()
    while await store.lease_alive("one"):
        assert anyio.current_time() - started < DEADLINE, "the lease never lapsed"
        await anyio.sleep(0.02)
    assert anyio.current_time() - started >= TTL / 2
    assert await store.lease_alive("two")
    await store.renew_lease("one", 60.0)  # a lapsed lease can be taken again
    assert await store.lease_alive("one")


async def test_aclose_twice_is_harmless_and_the_store_opens_again(store: TaskStore) -> None:
    await store.put([record(A)], history_ttl=None)
    await store.aclose()
    await store.aclose()
    assert await store.get(A) == record(A)
    await store.renew_lease("one", 60.0)
    assert await store.lease_alive("one")
