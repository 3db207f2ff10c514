"""The `TaskStore` contract: every store passes this suite (`tests/stores.py`
lists them; add yours there to check it).

Expiry is measured on the real clock with short lifetimes and bounded
polling, since stores such as Redis keep time on the server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
import pytest

from fastapi_bgplus import ConsoleStore

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


async def until_gone(store: ConsoleStore, task_id: str) -> float:
    """Seconds until `task_id` is unknown, polling for a bounded time."""
    started = anyio.current_time()
    while await store.get(task_id) is not None:
        assert anyio.current_time() - started < DEADLINE, f"{task_id} never expired"
        await anyio.sleep(0.02)
    return anyio.current_time() - started


async def test_an_unknown_id_is_none(store: ConsoleStore) -> None:
    assert await store.get(A) is None


async def test_a_record_reads_back_as_written(store: ConsoleStore) -> None:
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


async def test_a_record_read_is_a_copy(store: ConsoleStore) -> None:
    await store.put([record(A)], history_ttl=None)
    read = await store.get(A)
    assert read is not None
    read["status"] = "lost"
    assert await store.get(A) == record(A)


async def test_a_later_record_of_the_same_id_wins(store: ConsoleStore) -> None:
    await store.put([record(A), record(A, "running", attempts=1)], history_ttl=None)
    assert await store.get(A) == record(A, "running", attempts=1)
    await store.put([record(A, "done", attempts=1), record(B)], history_ttl=None)
    assert await store.get(A) == record(A, "done", attempts=1)
    await store.put([], history_ttl=None)  # an empty batch is fine
    assert await store.get(B) == record(B)


async def test_finished_records_expire_and_unfinished_ones_stay(store: ConsoleStore) -> None:
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


async def test_expiry_counts_from_the_last_write(store: ConsoleStore) -> None:
    await store.put([record(A, "done")], history_ttl=TTL)
    await anyio.sleep(TTL / 2)
    await store.put([record(A, "done", attempts=2)], history_ttl=TTL)
    started = anyio.current_time()
    await until_gone(store, A)
    assert anyio.current_time() - started > TTL / 2


async def test_a_finished_record_replacing_a_live_one_starts_expiring(store: ConsoleStore) -> None:
    await store.put([record(A, "running")], history_ttl=TTL)
    await store.put([record(A, "done")], history_ttl=TTL)
    await until_gone(store, A)


async def test_without_history_ttl_finished_records_stay(store: ConsoleStore) -> None:
    await store.put([record(A, "done")], history_ttl=None)
    await store.put([record(B, "done")], history_ttl=TTL)
    await until_gone(store, B)
    assert await store.get(A) == record(A, "done")


async def test_a_lease_lives_for_its_ttl_and_renewing_extends_it(store: ConsoleStore) -> None:
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


async def test_aclose_twice_is_harmless_and_the_store_opens_again(store: ConsoleStore) -> None:
    await store.put([record(A)], history_ttl=None)
    await store.aclose()
    await store.aclose()
    assert await store.get(A) == record(A)
    await store.renew_lease("one", 60.0)
    assert await store.lease_alive("one")


# The console's part: query, request_cancel, cancel_requests.


def queued(n: int, status: str = "done", name: str = "app.send_welcome_email") -> dict[str, Any]:
    """Record number `n`: queued `n` seconds after a fixed moment."""
    return record(
        f"{n:032x}", status, name=name, created_at=f"2026-01-02T03:{n // 60:02d}:{n % 60:02d}+00:00"
    )


def created_of(found: dict[str, Any]) -> float:
    """The order of `query`: when the task was queued, in seconds since the epoch."""
    return datetime.fromisoformat(found["created_at"]).timestamp()


def ids(records: list[dict[str, Any]]) -> list[int]:
    return [int(found["task_id"], 16) for found in records]


async def test_query_answers_the_newest_first_and_pages_by_key(store: ConsoleStore) -> None:
    await store.put([queued(n) for n in (3, 1, 4, 5, 9, 2, 6)], history_ttl=None)
    first = await store.query(limit=3)
    assert ids(first) == [9, 6, 5]
    assert first[0] == queued(9)
    last = first[-1]
    second = await store.query(limit=3, before=(created_of(last), last["task_id"]))
    assert ids(second) == [4, 3, 2]
    assert ids(await store.query(limit=50)) == [9, 6, 5, 4, 3, 2, 1]


async def test_query_filters_by_status_name_and_time(store: ConsoleStore) -> None:
    await store.put(
        [
            queued(1, "done"),
            queued(2, "failed"),
            queued(3, "running", name="app.resize"),
            queued(4, "failed", name="app.resize"),
            queued(5, "cancelled"),
            queued(6, "pending"),
        ],
        history_ttl=None,
    )
    assert ids(await store.query(statuses={"failed"})) == [4, 2]
    assert ids(await store.query(statuses={"failed", "cancelled", "pending"})) == [6, 5, 4, 2]
    assert ids(await store.query(name="app.resize")) == [4, 3]
    assert ids(await store.query(name="app.resize", statuses={"running"})) == [3]
    assert ids(await store.query(name="app.unknown")) == []
    since = created_of(queued(4))
    assert ids(await store.query(since=since)) == [6, 5, 4]
    assert ids(await store.query(since=since, statuses={"failed"})) == [4]
    last = queued(5)
    assert ids(await store.query(statuses={"failed", "cancelled"}, limit=1)) == [5]
    assert ids(
        await store.query(statuses={"failed", "cancelled"}, before=(created_of(last), C))
    ) == [5, 4, 2]  # `before` orders by id among records queued at the same moment


async def test_query_follows_a_records_latest_status(store: ConsoleStore) -> None:
    await store.put([queued(1, "pending"), queued(2, "pending")], history_ttl=None)
    await store.put([queued(1, "running")], history_ttl=None)
    await store.put([queued(1, "failed")], history_ttl=None)
    assert ids(await store.query(statuses={"pending", "running"})) == [2]
    assert ids(await store.query(statuses={"failed"})) == [1]
    assert ids(await store.query(name="app.send_welcome_email", statuses={"failed"})) == [1]


async def test_query_skips_expired_records(store: ConsoleStore) -> None:
    await store.put([queued(1, "done"), queued(2, "done")], history_ttl=TTL)
    await store.put([queued(3, "running")], history_ttl=TTL)
    assert ids(await store.query()) == [3, 2, 1]
    await until_gone(store, queued(1)["task_id"])
    await until_gone(store, queued(2)["task_id"])
    assert ids(await store.query()) == [3]
    assert ids(await store.query(statuses={"done"})) == []


async def test_a_page_of_ties_visits_each_record_once(store: ConsoleStore) -> None:
    moment = "2026-01-02T03:04:05+00:00"
    await store.put([record(f"{n:032x}", created_at=moment) for n in range(7)], history_ttl=None)
    seen: list[int] = []
    before = None
    while page := await store.query(limit=3, before=before):
        seen += ids(page)
        before = (created_of(page[-1]), page[-1]["task_id"])
    assert seen == [6, 5, 4, 3, 2, 1, 0]


async def test_cancel_requests_are_taken_once_per_owner_in_order(store: ConsoleStore) -> None:
    assert await store.cancel_requests("one") == []
    await store.request_cancel("one", B, "by the operator")
    await store.request_cancel("one", A, "by request")
    await store.request_cancel("two", C, "why not")
    assert await store.cancel_requests("one") == [(B, "by the operator"), (A, "by request")]
    assert await store.cancel_requests("one") == []
    assert await store.cancel_requests("two") == [(C, "why not")]
