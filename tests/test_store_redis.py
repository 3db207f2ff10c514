"""`RedisStore` against a real `redis-server` (see `tests/redis_server.py`).

The first group checks the task store contract through a `store` fixture, in
the form the shared contract suite takes (every store passes the same tests);
the rest is what only Redis has: URLs and clients, key prefixes, server-side
expiry, the server going away, and asyncio only.

RedisStore runs on asyncio only (redis-py's asyncio client needs an asyncio
event loop), so these tests run on asyncio; `test_trio_is_refused_clearly`
checks what trio gets instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio
import redis.exceptions

from fastapi_bgplus import RedisStore
from fastapi_bgplus._store_redis import UNFINISHED_EXPIRY_S
from tests._subprocess import run_python
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

POLL_DEADLINE_S = 3.0


@pytest.fixture
def anyio_backend() -> str:
    # redis-py's asyncio client runs on asyncio only; see test_trio_is_refused_clearly.
    return "asyncio"


@pytest.fixture
def store(redis_store: RedisStore) -> RedisStore:
    return redis_store


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the same server, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def record(status: str = "pending", task_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A record as the tracker writes it: `TaskHandle.to_dict()` plus the owner."""
    finished = status in {"done", "failed", "cancelled"}
    return {
        "task_id": task_id or uuid.uuid4().hex,
        "name": "app.send_email",
        "status": status,
        "created_at": "2026-11-25T09:00:00+00:00",
        "started_at": None if status == "pending" else "2026-11-25T09:00:01+00:00",
        "finished_at": "2026-11-25T09:00:02.500000+00:00" if finished else None,
        "duration_s": 1.5 if finished else None,
        "error": "ValueError" if status == "failed" else None,
        "attempts": 0 if status == "pending" else 1,
        "owner": "owner-1",
        **fields,
    }


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll `condition` until it holds, for at most POLL_DEADLINE_S (server-side expiry
    cannot be awaited otherwise)."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    while not await condition():
        assert time.monotonic() < deadline, "still not so after the deadline"
        await anyio.sleep(0.02)


# The contract: what every task store does.


async def test_unknown_task_is_none(store: RedisStore) -> None:
    assert await store.get(uuid.uuid4().hex) is None


async def test_a_record_reads_back_as_written(store: RedisStore) -> None:
    pending, failed = record("pending"), record("failed", owner="other")
    await store.put([pending, failed], history_ttl=None)
    assert await store.get(pending["task_id"]) == pending
    assert await store.get(failed["task_id"]) == failed


async def test_a_later_record_of_a_task_wins(store: RedisStore) -> None:
    task_id = uuid.uuid4().hex
    await store.put(
        [record("pending", task_id), record("running", task_id), record("done", task_id)],
        history_ttl=None,
    )
    assert (await store.get(task_id) or {})["status"] == "done"
    await store.put([record("running", task_id, attempts=2)], history_ttl=None)
    assert await store.get(task_id) == record("running", task_id, attempts=2)


async def test_a_batch_of_many_tasks(store: RedisStore) -> None:
    records = [record("running") for _ in range(500)]
    await store.put(records, history_ttl=60.0)
    assert [await store.get(r["task_id"]) for r in records] == records


async def test_an_empty_batch_writes_nothing(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    await store.put([], history_ttl=60.0)
    assert await raw.keys(f"{store.prefix}*") == []


async def test_finished_records_expire_after_history_ttl(store: RedisStore) -> None:
    finished = [record(status) for status in ("done", "failed", "cancelled")]
    unfinished = [record(status) for status in ("pending", "running")]
    await store.put(finished + unfinished, history_ttl=0.2)
    for r in finished + unfinished:
        assert await store.get(r["task_id"]) == r

    async def finished_gone() -> bool:
        return all([await store.get(r["task_id"]) is None for r in finished])

    await eventually(finished_gone)
    # The lease, not the history, governs unfinished records.
    for r in unfinished:
        assert await store.get(r["task_id"]) == r


async def test_history_ttl_counts_from_the_finished_write(store: RedisStore) -> None:
    running = record("running")
    done = record("done", running["task_id"])
    await store.put([running], history_ttl=0.1)
    await anyio.sleep(0.2)
    assert await store.get(running["task_id"]) == running
    await store.put([done], history_ttl=0.3)
    assert await store.get(running["task_id"]) == done

    async def gone() -> bool:
        return await store.get(running["task_id"]) is None

    await eventually(gone)


async def test_a_record_already_past_its_history_is_dropped(store: RedisStore) -> None:
    running = record("running")
    await store.put([running], history_ttl=None)
    await store.put([record("done", running["task_id"])], history_ttl=0)
    assert await store.get(running["task_id"]) is None


async def test_a_lease_is_alive_until_it_lapses(store: RedisStore) -> None:
    assert not await store.lease_alive("owner-a")
    await store.renew_lease("owner-a", 0.2)
    assert await store.lease_alive("owner-a")
    assert not await store.lease_alive("owner-b")

    async def lapsed() -> bool:
        return not await store.lease_alive("owner-a")

    await eventually(lapsed)


async def test_renewing_a_lease_extends_it(store: RedisStore) -> None:
    await store.renew_lease("owner-a", 0.2)
    await store.renew_lease("owner-a", 60.0)
    await anyio.sleep(0.4)
    assert await store.lease_alive("owner-a")


async def test_a_lease_renewed_for_no_time_is_not_alive(store: RedisStore) -> None:
    await store.renew_lease("owner-a", 60.0)
    await store.renew_lease("owner-a", 0)
    assert not await store.lease_alive("owner-a")


# What only Redis has.


async def test_keys_values_and_expiries_in_redis(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    pending, done, kept = record("pending"), record("done"), record("failed")
    await store.put([pending, done], history_ttl=30.0)
    await store.put([kept], history_ttl=None)
    await store.renew_lease("owner-1", 10.0)
    key = f"{store.prefix}task:{done['task_id']}"
    assert set(await raw.keys(f"{store.prefix}*")) == {
        f"{store.prefix}task:{pending['task_id']}",
        key,
        f"{store.prefix}task:{kept['task_id']}",
        f"{store.prefix}lease:owner-1",
        # The console's indexes (sorted sets), and when each record expires.
        f"{store.prefix}by:all",
        *(f"{store.prefix}by:status:{status}" for status in ("pending", "done", "failed")),
        *(f"{store.prefix}by:name:{s}:app.send_email" for s in ("pending", "done", "failed")),
        f"{store.prefix}expiry",
    }
    assert await raw.get(key) == (
        f'{{"task_id":"{done["task_id"]}","name":"app.send_email","status":"done",'
        '"created_at":"2026-11-25T09:00:00+00:00","started_at":"2026-11-25T09:00:01+00:00",'
        '"finished_at":"2026-11-25T09:00:02.500000+00:00","duration_s":1.5,"error":null,'
        '"attempts":1,"owner":"owner-1"}'
    )
    assert 29_000 < await raw.pttl(key) <= 30_000
    pending_ttl = await raw.ttl(f"{store.prefix}task:{pending['task_id']}")
    assert UNFINISHED_EXPIRY_S - 5 < pending_ttl <= UNFINISHED_EXPIRY_S == 7 * 24 * 3600
    assert await raw.ttl(f"{store.prefix}task:{kept['task_id']}") == -1  # no expiry
    assert 9_000 < await raw.pttl(f"{store.prefix}lease:owner-1") <= 10_000


async def test_two_prefixes_do_not_see_each_other(redis_server: RedisServer) -> None:
    first = RedisStore(redis_server.url, prefix=f"one-{uuid.uuid4().hex}:")
    second = RedisStore(redis_server.url, prefix=f"two-{uuid.uuid4().hex}:")
    task_id = uuid.uuid4().hex
    await first.put([record("done", task_id)], history_ttl=None)
    await first.renew_lease("owner-1", 60.0)
    assert await second.get(task_id) is None
    assert not await second.lease_alive("owner-1")
    await second.put([record("running", task_id)], history_ttl=None)
    assert (await first.get(task_id) or {})["status"] == "done"
    assert (await second.get(task_id) or {})["status"] == "running"
    await first.aclose()
    await second.aclose()


async def test_the_default_prefix(redis_server: RedisServer, raw: redis.asyncio.Redis) -> None:
    store = RedisStore(redis_server.url)
    done = record("done")
    await store.put([done], history_ttl=5.0)
    assert await raw.exists(f"fastapi_bgplus:task:{done['task_id']}")
    await store.aclose()


async def test_a_client_passed_in_is_used_and_left_open(
    redis_server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, db=1)
    store = RedisStore(client, prefix="passed:")
    done = record("done")
    await store.put([done], history_ttl=5.0)
    assert await store.get(done["task_id"]) == done
    assert not await raw.exists(f"passed:task:{done['task_id']}")  # db 0
    assert await client.exists(f"passed:task:{done['task_id']}")  # db 1
    await store.aclose()
    assert await client.ping()  # still the caller's, still open
    await client.delete(f"passed:task:{done['task_id']}")
    await client.aclose()


async def connected_clients(raw: redis.asyncio.Redis) -> int:
    return int((await raw.info("clients"))["connected_clients"])


async def test_a_store_built_from_a_url_closes_its_client(
    redis_server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    before = await connected_clients(raw)
    store = RedisStore(redis_server.url, prefix=f"{uuid.uuid4().hex}:")
    await store.renew_lease("owner-1", 5.0)
    assert await connected_clients(raw) == before + 1
    await store.aclose()

    async def closed() -> bool:
        return await connected_clients(raw) == before

    await eventually(closed)


@pytest.mark.parametrize("scheme", ["redis", "unix"])
async def test_url_options_reach_the_server(
    redis_server: RedisServer, raw: redis.asyncio.Redis, scheme: str
) -> None:
    url = {
        "redis": f"redis://127.0.0.1:{redis_server.port}/2",
        "unix": f"unix://{redis_server.unix_socket}?db=2",
    }[scheme]
    store = RedisStore(url, prefix=f"{scheme}:")
    done = record("done")
    await store.put([done], history_ttl=5.0)
    assert await store.get(done["task_id"]) == done
    assert not await raw.exists(f"{scheme}:task:{done['task_id']}")  # db 0
    db2 = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, db=2)
    assert await db2.delete(f"{scheme}:task:{done['task_id']}") == 1
    await db2.aclose()
    await store.aclose()


async def test_the_server_going_away_raises_and_coming_back_works(
    redis_server: RedisServer, store: RedisStore
) -> None:
    before = record("running")
    await store.put([before], history_ttl=None)
    redis_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            await store.put([record("done", before["task_id"])], history_ttl=None)
        with pytest.raises(redis.exceptions.ConnectionError):
            await store.get(before["task_id"])
        with pytest.raises(redis.exceptions.ConnectionError):
            await store.renew_lease("owner-1", 5.0)
        with pytest.raises(redis.exceptions.ConnectionError):
            await store.lease_alive("owner-1")
        assert time.monotonic() - started < 2.0  # refused at once, not retried for long
    finally:
        redis_server.start()
    # Persistence is off: what was written before is gone, new writes go through
    # on the same store, over new connections.
    assert await store.get(before["task_id"]) is None
    after = record("done", before["task_id"])
    await store.put([after], history_ttl=None)
    assert await store.get(before["task_id"]) == after
    await store.renew_lease("owner-1", 5.0)
    assert await store.lease_alive("owner-1")


async def test_a_restart_between_two_calls_goes_unnoticed(
    redis_server: RedisServer, store: RedisStore
) -> None:
    await store.renew_lease("owner-1", 5.0)  # a pooled connection, idle from here on
    redis_server.stop()
    redis_server.start()
    # The pooled connection is dead: the store retries once, on a new one.
    await store.renew_lease("owner-1", 5.0)
    assert await store.lease_alive("owner-1")


@pytest.mark.parametrize(
    ("query", "timeout_s"),
    [("", 2.0), ("?socket_timeout=0.3", 0.3)],
    ids=["default", "from-the-url"],
)
async def test_a_silent_server_times_out_once_not_retried(
    redis_server: RedisServer, query: str, timeout_s: float
) -> None:
    store = RedisStore(redis_server.url + query, prefix=f"{uuid.uuid4().hex}:")
    await store.renew_lease("owner-1", 5.0)  # connected
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            await store.lease_alive("owner-1")
        waited = time.monotonic() - started
    finally:
        redis_server.resume()
    assert timeout_s * 0.9 < waited < timeout_s * 1.8  # a retry would wait twice
    assert await store.lease_alive("owner-1")
    await store.aclose()


def test_a_wrong_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"Redis URL .* or a redis\.asyncio\.Redis client, not"):
        RedisStore(b"redis://localhost")  # type: ignore[arg-type]


def test_repr_names_the_prefix_and_no_password() -> None:
    store = RedisStore("redis://user:secret@127.0.0.1:1/0", prefix="app:")
    assert repr(store) == "<RedisStore prefix='app:'>"


def test_trio_is_refused_clearly() -> None:
    # redis-py's asyncio client opens asyncio streams and takes asyncio locks: it
    # cannot run under trio, so every method says so before touching the network.
    store = RedisStore("redis://127.0.0.1:1/0")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put([record("done")], history_ttl=None),
        lambda: store.get("x"),
        lambda: store.renew_lease("owner-1", 1.0),
        lambda: store.lease_alive("owner-1"),
    ]
    for call in calls:

        async def main(call: Callable[[], Awaitable[object]] = call) -> None:
            await call()

        with pytest.raises(RuntimeError, match=r"RedisStore runs on asyncio only: .* such as trio"):
            anyio.run(main, backend="trio")


def test_import_fastapi_bgplus_does_not_import_redis() -> None:
    script = """
        import sys
        import fastapi_bgplus
        assert "redis" not in sys.modules, "import fastapi_bgplus imported redis"
        assert "RedisStore" in fastapi_bgplus.__all__
        from fastapi_bgplus import RedisStore
        assert "redis" in sys.modules
        assert fastapi_bgplus.RedisStore is RedisStore
        print("lazy ok")
    """
    assert run_python(script) == "lazy ok"


def test_without_redis_installed_the_error_says_which_extra() -> None:
    script = """
        import fastapi_bgplus
        try:
            fastapi_bgplus.RedisStore
        except ModuleNotFoundError as exc:
            print(exc)
    """
    assert run_python(script, without=["redis"]) == (
        "RedisStore needs the redis package: pip install 'fastapi-bgplus[redis]'"
    )


async def test_hundreds_of_concurrent_lookups_wait_for_a_connection_and_are_served(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, prefix=f"{uuid.uuid4().hex}:")
    done = record("done")
    await store.put([done], history_ttl=None)
    answers: list[Any] = []

    async def lookup() -> None:
        answers.append(await store.get(done["task_id"]))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for _ in range(400):
                group.start_soon(lookup)
    await store.aclose()
    assert answers == [done] * 400


def test_max_connections_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="max_connections must be an int >= 1"):
        RedisStore("redis://127.0.0.1:1/0", max_connections=0)


async def test_a_running_task_reads_running_again_soon_after_a_restart_that_lost_everything(
    redis_server: RedisServer,
) -> None:
    from fastapi_bgplus import TaskTracker, TrackedBackgroundTasks

    prefix = f"{uuid.uuid4().hex}:"
    here = TaskTracker(store=RedisStore(redis_server.url, prefix=prefix))
    there = TaskTracker(store=RedisStore(redis_server.url, prefix=prefix))
    running = anyio.Event()

    async def forever() -> None:
        running.set()
        await anyio.sleep_forever()

    async with here.lifespan(None) as state, there.lifespan(None):
        tasks = TrackedBackgroundTasks.for_request({"type": "http", "state": state})
        handle = tasks.add_task(forever)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.run)
            await running.wait()
            await until(there, handle.task_id, "running")
            redis_server.stop()
            redis_server.start()  # persistence off: the record and the lease are gone
            started = time.monotonic()
            await until(there, handle.task_id, "running")
            assert time.monotonic() - started < 1.5
            group.cancel_scope.cancel()


async def until(tracker: Any, task_id: str, status: str) -> None:
    """Poll `tracker.lookup` until it answers `status` (a failed lookup counts as not yet)."""
    with anyio.fail_after(POLL_DEADLINE_S):
        while True:
            try:
                record = await tracker.lookup(task_id)
            except Exception:
                record = None
            if record is not None and record["status"] == status:
                return
            await anyio.sleep(0.05)


async def test_expired_records_leave_the_query_indexes(
    store: RedisStore, raw: redis.asyncio.Redis
) -> None:
    gone, kept = record("done"), record("running")
    await store.put([gone, kept], history_ttl=0.1)
    await anyio.sleep(0.3)
    assert [found["task_id"] for found in await store.query()] == [kept["task_id"]]
    # A writer starting later purges what expired from the indexes.
    later = RedisStore(raw, prefix=store.prefix)
    await later.put([record("done")], history_ttl=60.0)
    members = {
        key: await raw.zrange(f"{store.prefix}{key}", 0, -1)
        for key in ("by:all", "by:status:done", "by:name:done:app.send_email", "expiry")
    }
    for key, ids in members.items():
        assert not any(gone["task_id"] in member for member in ids), key
    assert kept["task_id"] in members["by:all"]
