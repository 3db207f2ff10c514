"""`TaskTracker(store=...)`: lookups across processes, leases and ``lost``,
write-behind, and a store that fails (issue 10).

Two trackers sharing one store stand for two worker processes; a real
multi-worker server is in `tests/test_workers.py`. The store's own contract
is `tests/test_store_contract.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_bgplus import (
    BackgroundTasks,
    MemoryStore,
    SQLiteStore,
    TaskHandle,
    TaskStore,
    TaskTracker,
    TrackedBackgroundTasks,
)
from fastapi_bgplus._store import StoreWriter

from .apps.memory import noop, run_tasks
from .conftest import FASTAPI

Backend = Literal["asyncio", "trio"]
DEADLINE = 5.0


@pytest.fixture(autouse=True)
def _log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastapi_bgplus"
        and r.levelno == logging.WARNING
        and "task store" in r.getMessage()
    ]


class FlakyStore(MemoryStore):
    """A `MemoryStore` that fails while `failing` is set, and can hold its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.failures = 0
        self._failed_enough: anyio.Event | None = None
        self.enough = 3
        self.hold: anyio.Event | None = None
        self.puts = 0

    @property
    def failed_enough(self) -> anyio.Event:
        """Set once `enough` writes have failed; made in the event loop, as
        anyio 4.1 (the floor) requires."""
        if self._failed_enough is None:
            self._failed_enough = anyio.Event()
        return self._failed_enough

    def _check(self) -> None:
        if self.failing:
            self.failures += 1
            if self.failures >= self.enough:
                self.failed_enough.set()
            raise ConnectionError("the store is down")

    async def put(self, records: Sequence[dict[str, Any]], *, history_ttl: float | None) -> None:
        self._check()
        if self.hold is not None:
            await self.hold.wait()
        self.puts += 1
        await super().put(records, history_ttl=history_ttl)

    async def renew_lease(self, owner: str, ttl: float) -> None:
        self._check()
        await super().renew_lease(owner, ttl)

    async def get(self, task_id: str) -> dict[str, Any] | None:
        self._check()
        return await super().get(task_id)


async def eventually(
    tracker: TaskTracker, task_id: str, status: str | None
) -> dict[str, Any] | None:
    """Poll `lookup` until the record has `status` (None: until unknown);
    return it and fail past the deadline."""
    with anyio.fail_after(DEADLINE):
        while True:
            record = await tracker.lookup(task_id)
            if (record and record["status"]) == status:
                return record
            await anyio.sleep(0.02)


async def stored(store: TaskStore, handles: Sequence[TaskHandle]) -> None:
    """Poll `store` until it holds a record of each handle; fail past the deadline."""
    deadline = anyio.current_time() + DEADLINE
    for handle in handles:
        while await store.get(handle.task_id) is None:
            assert anyio.current_time() < deadline, f"{handle} never reached the store"
            await anyio.sleep(0.02)


@asynccontextmanager
async def serving(*trackers: TaskTracker) -> AsyncIterator[list[Mapping[str, Any]]]:
    async with (
        trackers[0].lifespan(None) as first,
        trackers[1].lifespan(None) if len(trackers) > 1 else _none() as second,
    ):
        yield [first, second]


@asynccontextmanager
async def _none() -> AsyncIterator[Mapping[str, Any]]:
    yield {}


# Lookups


@pytest.mark.anyio
async def test_any_process_looks_up_the_tasks_of_another_within_a_second() -> None:
    store = MemoryStore()
    here, there = TaskTracker(store=store), TaskTracker(store=store)
    async with serving(here, there) as (state, _):
        started = anyio.current_time()
        handles = await run_tasks(state, 3)
        for handle in handles:
            # This process answers from memory, at once, with or without the store.
            assert await here.lookup(handle.task_id) == handle.to_dict()
            assert there.get(handle.task_id) is None  # get() stays local
            record = await eventually(there, handle.task_id, "done")
            assert record == handle.to_dict()  # the owner's lease id is not shown
        assert anyio.current_time() - started < 1.0


@pytest.mark.anyio
async def test_each_status_change_reaches_the_other_processes() -> None:
    store = MemoryStore()
    here, there = TaskTracker(store=store), TaskTracker(store=store)
    release = anyio.Event()
    running = anyio.Event()

    async def slow() -> None:
        running.set()
        await release.wait()

    async def failing() -> None:
        raise ValueError("crm.example.com answered with a secret message")

    async with serving(here, there) as (state, _), anyio.create_task_group() as group:
        tasks = request_collection(state)
        slow_handle = tasks.add_task(slow)
        failing_handle = tasks.add_task(failing)
        assert await eventually(there, slow_handle.task_id, "pending")
        assert await eventually(there, failing_handle.task_id, "pending")
        group.start_soon(tasks.run)
        await running.wait()
        record = await eventually(there, slow_handle.task_id, "running")
        assert record is not None
        assert record["attempts"] == 1
        assert record["started_at"] is not None
        release.set()
        record = await eventually(there, failing_handle.task_id, "failed")
        assert record is not None
        assert record["error"] == "ValueError"
        assert "secret message" not in str(record)  # no exception message in the store
        assert await eventually(there, slow_handle.task_id, "done")


def request_collection(state: Mapping[str, Any]) -> TrackedBackgroundTasks:
    """A request's collection, bound to the tracker in `state`, run by the test."""
    return TrackedBackgroundTasks.for_request({"type": "http", "state": dict(state)})


@pytest.mark.anyio
async def test_an_unknown_or_malformed_id_is_none_without_asking_the_store() -> None:
    store = FlakyStore()
    tracker = TaskTracker(store=store)
    async with tracker.lifespan(None):
        assert await tracker.lookup("0" * 32) is None
        store.failing = True
        assert await tracker.lookup("../etc/passwd") is None
        with pytest.raises(ConnectionError):
            await tracker.lookup("0" * 32)


@pytest.mark.anyio
async def test_without_a_store_lookup_knows_only_this_process() -> None:
    tracker = TaskTracker()
    async with tracker.lifespan(None) as state:
        (handle,) = await run_tasks(state, 1)
        assert await tracker.lookup(handle.task_id) == handle.to_dict()
        assert await tracker.lookup("0" * 32) is None


@pytest.mark.skipif(FASTAPI < (0, 121), reason="detached mode needs FastAPI's request exit stacks")
def test_detached_tasks_reach_the_store_after_a_restart_too(anyio_backend: Backend) -> None:
    store = MemoryStore()
    tracker = TaskTracker(store=store, detach=True)
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/queue")
    async def queue(tasks: BackgroundTasks) -> str:
        return tasks.add_task(noop).task_id

    for _ in range(2):  # and again once the tracker has started anew
        with TestClient(app, backend=anyio_backend) as client:
            task_id = client.post("/queue").json()
        # Written at the latest at shutdown, after the drain.
        stored_record = anyio.run(store.get, task_id)
        assert stored_record is not None
        assert stored_record["status"] == "done"


# Leases and lost tasks


def record(task_id: str, status: str, **fields: Any) -> dict[str, Any]:
    return {**TaskHandle("app.job").to_dict(), "task_id": task_id, "status": status, **fields}


@pytest.mark.anyio
async def test_an_unfinished_task_whose_lease_lapsed_answers_lost() -> None:
    store = MemoryStore()
    tracker = TaskTracker(store=store)
    ids = {status: f"{index}" * 32 for index, status in enumerate(["pending", "running", "done"])}
    async with tracker.lifespan(None):
        await store.renew_lease("dying", 0.2)
        await store.put(
            [record(task_id, status, owner="dying") for status, task_id in ids.items()]
            + [record("9" * 32, "running")],  # written by a store that keeps no owner
            history_ttl=None,
        )
        for status, task_id in ids.items():
            assert await eventually(tracker, task_id, status)
        started = anyio.current_time()
        assert await eventually(tracker, ids["running"], "lost")
        assert anyio.current_time() - started < 0.2 + 0.1
        assert await eventually(tracker, ids["pending"], "lost")
        assert await eventually(tracker, ids["done"], "done")  # its end was reported
        assert await eventually(tracker, "9" * 32, "lost")


@pytest.mark.anyio
async def test_a_process_cut_off_from_the_store_has_its_running_tasks_answer_lost() -> None:
    """What the others see of a process killed while its task runs: its lease
    is not renewed, so within lease_ttl its task answers "lost"."""
    shared = MemoryStore()
    doomed = FlakyStore()
    doomed._records = shared._records  # one store, seen through a link that breaks
    doomed._leases = shared._leases
    here = TaskTracker(store=doomed, lease_ttl=1.0, drain_timeout=0)
    there = TaskTracker(store=shared)
    running = anyio.Event()

    async def forever() -> None:
        running.set()
        await anyio.sleep_forever()

    async with serving(here, there) as (state, _), anyio.create_task_group() as group:
        tasks = request_collection(state)
        handle = tasks.add_task(forever)
        group.start_soon(tasks.run)
        await running.wait()
        assert await eventually(there, handle.task_id, "running")
        doomed.failing = True
        started = anyio.current_time()
        assert await eventually(there, handle.task_id, "lost")
        assert anyio.current_time() - started < 1.0 + 0.5
        assert await here.lookup(handle.task_id) == handle.to_dict()  # it knows better
        assert handle.status == "running"
        group.cancel_scope.cancel()


# Write-behind


@pytest.mark.anyio
async def test_requests_and_tasks_never_wait_for_the_store() -> None:
    store = FlakyStore()
    store.hold = anyio.Event()  # every write hangs until released
    tracker = TaskTracker(store=store)
    async with tracker.lifespan(None) as state:
        with anyio.fail_after(DEADLINE):
            handles = [handle for _ in range(50) for handle in await run_tasks(state, 2)]
        assert all(handle.status == "done" for handle in handles)
        assert store.puts == 0
        store.hold.set()
        for handle in handles:
            assert await eventually(tracker, handle.task_id, "done")
    # Written in a few batches (one per flush), not one per task.
    assert 1 <= store.puts <= 5
    for handle in handles:
        assert await store.get(handle.task_id) is not None


@pytest.mark.anyio
async def test_a_failing_store_fails_nothing_and_warns_once_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    tracker = TaskTracker(store=store)
    async with tracker.lifespan(None) as state:
        store.failing = True
        handles = await run_tasks(state, 3)
        await store.failed_enough.wait()  # three writes failed
        handles += await run_tasks(state, 2)
        assert all(handle.status == "done" for handle in handles)
        (warning,) = store_warnings(caplog)
        assert "failed (ConnectionError: the store is down)" in warning
        assert "record(s) wait to be written" in warning
        assert "Tasks run as usual" in warning
        # This process still answers for its own tasks.
        assert await tracker.lookup(handles[0].task_id) == handles[0].to_dict()
        store.failing = False
        await stored(store, handles)
    assert len(store_warnings(caplog)) == 1
    assert "works again" in caplog.text
    for handle in handles:
        assert await store.get(handle.task_id) == {**handle.to_dict(), "owner": _owner(store)}


def _owner(store: MemoryStore) -> str:
    (owner,) = store._leases
    return owner


def handles(count: int) -> list[TaskHandle]:
    """Handles of `count` tasks not yet run."""
    return [TaskHandle("app.job") for _ in range(count)]


async def ran(count: int) -> list[TaskHandle]:
    """Handles of `count` tasks that ran and are done."""
    tasks = TrackedBackgroundTasks()
    made = [tasks.add_task(noop) for _ in range(count)]
    await tasks.run()
    return made


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_one_warning_per_window_and_a_bounded_buffer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    clock = FakeClock()
    writer = StoreWriter(
        store, lease_ttl=30.0, history_ttl=None, max_buffered=4, warn_every=30.0, clock=clock
    )
    await writer.start()
    run: Any = None  # the writer never cancels anything
    store.failing = True
    live = handles(2)
    finished = await ran(3)
    for handle in live[:1] + finished + live[1:]:
        writer.task_queued(handle, run)
    assert writer.buffered == 4  # the oldest finished one went
    for now in (1.0, 10.0, 29.9):
        clock.now = now
        assert not await writer.flush()
    assert len(store_warnings(caplog)) == 1
    assert "1 dropped from the full buffer since" in store_warnings(caplog)[0]
    clock.now = 31.0
    assert not await writer.flush()
    assert len(store_warnings(caplog)) == 2
    assert "dropped" not in store_warnings(caplog)[1]
    # The finished records go first; then, with only unfinished ones left, the oldest.
    newer = handles(3)
    for handle in newer:
        writer.task_started(handle)
    assert writer.buffered == 4
    store.failing = False
    assert await writer.flush()
    for handle in [live[0], *finished]:
        assert await store.get(handle.task_id) is None
    for handle in [live[1], *newer]:
        assert await store.get(handle.task_id) is not None
    # The lease was renewed once due (every lease_ttl / 3).
    assert await store.lease_alive(writer.owner)


@pytest.mark.anyio
async def test_a_write_that_fails_keeps_newer_transitions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    writer = StoreWriter(store, lease_ttl=30.0, history_ttl=None, max_buffered=2)
    await writer.start()
    first, second, third = handles(3)
    writer.task_queued(first, None)  # type: ignore[arg-type]
    writer.task_queued(second, None)  # type: ignore[arg-type]
    original = store.put

    async def put_then_fail(records: Sequence[dict[str, Any]], **kwargs: Any) -> None:
        writer.task_started(third)  # a transition filed while the write runs
        writer.task_ended(first)
        raise ConnectionError("the store is down")

    store.put = put_then_fail  # type: ignore[method-assign]
    assert not await writer.flush()
    assert writer.buffered == 2
    store.put = original  # type: ignore[method-assign]
    assert await writer.flush()
    assert await store.get(first.task_id) is None  # dropped: buffer of 2
    assert await store.get(second.task_id) is not None
    assert await store.get(third.task_id) is not None


@pytest.mark.anyio
async def test_a_task_handed_off_to_a_queue_is_left_to_its_worker_to_write() -> None:
    """A taskiq task leaves the process `pending`; its worker writes its record
    from then on, and this process must not overwrite it with its own."""
    store = MemoryStore()
    writer = StoreWriter(store, lease_ttl=30.0, history_ttl=None)
    await writer.start()
    kept, handed_off = handles(2)
    writer.task_queued(kept, None)  # type: ignore[arg-type]
    writer.task_queued(handed_off, None)  # type: ignore[arg-type]
    worker_record = {**handed_off.to_dict(), "status": "running", "owner": "worker"}
    await store.put([worker_record], history_ttl=None)
    writer.task_handed_off(handed_off)
    assert await writer.flush()
    assert await store.get(kept.task_id) is not None
    assert await store.get(handed_off.task_id) == worker_record


# Startup and shutdown


@pytest.mark.anyio
async def test_tasks_cut_off_at_shutdown_are_written_after_the_drain() -> None:
    store = MemoryStore()
    tracker = TaskTracker(store=store, drain_timeout=0)
    running = anyio.Event()

    async def forever() -> None:
        running.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as group, tracker.lifespan(None) as state:
        tasks = request_collection(state)
        handle = tasks.add_task(forever)
        later = tasks.add_task(noop)
        group.start_soon(tasks.run)
        await running.wait()
    for task in (handle, later):
        stored = await store.get(task.task_id)
        assert stored is not None
        assert stored["status"] == "cancelled"


@pytest.mark.anyio
async def test_shutdown_does_not_wait_for_a_hung_store_past_its_bound(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FlakyStore()
    store.hold = anyio.Event()  # never set

    tracker = TaskTracker(store=store, shutdown_grace=0.1)
    with anyio.fail_after(DEADLINE):
        async with tracker.lifespan(None) as state:
            await run_tasks(state, 2)
    assert "2 task record(s) could not be written to the task store" in caplog.text


@pytest.mark.anyio
async def test_a_store_that_fails_to_close_is_logged() -> None:
    class BadClose(MemoryStore):
        async def aclose(self) -> None:
            raise OSError("disk gone")

    tracker = TaskTracker(store=BadClose())
    async with tracker.lifespan(None):
        pass


@pytest.mark.anyio
async def test_an_unusable_sqlite_path_stops_the_startup_and_says_what_to_do(
    tmp_path: Path,
) -> None:
    tracker = TaskTracker(store=SQLiteStore(tmp_path))  # a directory, not a file
    with pytest.raises(RuntimeError, match="could not reach its task store") as caught:
        async with tracker.lifespan(None):
            pass  # pragma: no cover
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "directory exists" in message
    assert isinstance(caught.value.__cause__, OSError)
    # The tracker is free again, and starts with a usable path.
    tracker.store = SQLiteStore(tmp_path / "tasks.db")
    async with tracker.lifespan(None) as state:
        (handle,) = await run_tasks(state, 1)
    reader = SQLiteStore(tmp_path / "tasks.db")
    try:
        assert await reader.get(handle.task_id) is not None
    finally:
        await reader.aclose()


@pytest.mark.anyio
async def test_a_file_that_is_not_a_database_stops_the_startup(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(b"not a database, but someone's notes " * 100)
    tracker = TaskTracker(store=SQLiteStore(path))
    with pytest.raises(RuntimeError, match=r"file is not a database\. Check that its directory"):
        async with tracker.lifespan(None):
            pass  # pragma: no cover


@pytest.mark.anyio
async def test_an_error_in_the_application_passes_through_the_lifespan_as_it_is() -> None:
    store = MemoryStore()
    tracker = TaskTracker(store=store)
    queued: list[TaskHandle] = []

    async def serve() -> None:
        async with tracker.lifespan(None) as state:
            queued.extend(await run_tasks(state, 1))
            raise LookupError("raised while serving")

    with pytest.raises(LookupError, match="raised while serving"):
        await serve()
    assert await store.get(queued[0].task_id) is not None  # written at shutdown all the same


def test_a_locked_sqlite_database_fails_no_request_and_status_flows_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, anyio_backend: Backend
) -> None:
    """Another process holds the write lock (a long transaction, a backup):
    writes fail after busy_timeout, requests answer and tasks run as usual,
    lookups do not queue behind the blocked writes, one WARNING is logged,
    and once the lock is gone every record is written."""
    path = tmp_path / "tasks.db"
    store = SQLiteStore(path, busy_timeout=1.0)
    tracker = TaskTracker(store=store)
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router(prefix="/tasks"))

    @app.post("/queue")
    async def queue(tasks: BackgroundTasks) -> str:
        return tasks.add_task(noop).task_id

    other = sqlite3.connect(path, isolation_level=None)  # another process
    elsewhere = record("e" * 32, "done", owner="gone")

    def in_store(ids: list[str]) -> int:
        marks = ",".join("?" * len(ids))
        query = f"SELECT count(*) FROM bgplus_tasks WHERE task_id IN ({marks})"
        count: int = other.execute(query, ids).fetchone()[0]
        return count

    try:
        with TestClient(app, backend=anyio_backend) as client:
            assert client.portal is not None
            client.portal.call(functools.partial(store.put, [elsewhere], history_ttl=None))
            other.execute("BEGIN EXCLUSIVE")
            ids = []
            deadline = time.monotonic() + DEADLINE
            while not store_warnings(caplog):
                assert time.monotonic() < deadline, "no warning"
                response = client.post("/queue")
                assert response.status_code == 200
                ids.append(response.json())
                started = time.monotonic()
                assert client.get(f"/tasks/{'e' * 32}").json()["status"] == "done"
                assert time.monotonic() - started < 0.5  # not behind a blocked write
                time.sleep(0.05)
            assert all(client.get(f"/tasks/{i}").json()["status"] == "done" for i in ids)
            assert "database is locked" in store_warnings(caplog)[0]
            other.execute("ROLLBACK")
            while in_store(ids) < len(ids):
                assert time.monotonic() < deadline + DEADLINE, "never written"
                time.sleep(0.05)
        assert len(store_warnings(caplog)) == 1
    finally:
        other.close()


# The status route


def test_the_status_route_answers_for_other_processes_and_503_without_the_store(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    tracker = TaskTracker(store=store)
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router(prefix="/tasks"))

    @app.post("/queue")
    async def queue(tasks: BackgroundTasks) -> str:
        return tasks.add_task(noop).task_id

    elsewhere = record("e" * 32, "running", owner="gone")
    with TestClient(app, backend=anyio_backend) as client:
        assert client.portal is not None
        client.portal.call(functools.partial(store.put, [elsewhere], history_ttl=None))
        response = client.get(f"/tasks/{'e' * 32}")
        assert response.status_code == 200
        expected = {**elsewhere, "status": "lost"}
        del expected["owner"]  # the lease id is the store's business
        assert response.json() == expected
        own = client.post("/queue").json()
        store.failing = True
        assert client.get(f"/tasks/{own}").status_code == 200  # its own, from memory
        for _ in range(5):
            response = client.get(f"/tasks/{'e' * 32}")
            assert response.status_code == 503
            assert response.json() == {"detail": "Task store unavailable"}
        assert client.get("/tasks/not-an-id").status_code == 404
        # The log is not flooded: lookups log nothing, the writer warns once.
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 1, warnings
        store.failing = False


# Configuration


@pytest.mark.parametrize("lease_ttl", [0, -1.0, 0.5, 1e-6, math.nan, math.inf, 10**400, "30", True])
def test_lease_ttl_must_be_at_least_a_second(lease_ttl: Any) -> None:
    with pytest.raises(ValueError, match=r"lease_ttl must be a number of seconds >= 1\.0, finite"):
        TaskTracker(store=MemoryStore(), lease_ttl=lease_ttl)


def test_a_store_missing_methods_is_refused_by_name() -> None:
    class Partial:
        async def get(self, task_id: str) -> None:
            return None

        put = "not callable"

    with pytest.raises(TypeError, match="Partial lacks put, renew_lease, lease_alive, aclose"):
        TaskTracker(store=Partial())  # type: ignore[arg-type]


def test_the_stores_are_typed_as_the_protocol() -> None:
    assert isinstance(MemoryStore(), TaskStore)
    assert isinstance(SQLiteStore("tasks.db"), TaskStore)
    assert repr(SQLiteStore("tasks.db")) == "SQLiteStore('tasks.db')"
    assert repr(MemoryStore()) == "<MemoryStore 0 record(s)>"


def test_import_does_not_import_sqlite3_and_other_names_are_missing() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fastapi_bgplus;"
        "assert 'sqlite3' not in sys.modules, 'sqlite3';"
        "assert 'redis' not in sys.modules, 'redis';"
        "from fastapi_bgplus import SQLiteStore;"
        "assert 'sqlite3' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import fastapi_bgplus

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchStore'"):
        fastapi_bgplus.NoSuchStore  # noqa: B018
    assert fastapi_bgplus.SQLiteStore is SQLiteStore


@pytest.mark.anyio
async def test_a_sqlite_database_written_by_0_2_is_read_and_queried(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    old = sqlite3.connect(path)  # fastapi-bgplus 0.2's tables, with one record
    old.executescript(
        "CREATE TABLE bgplus_tasks (task_id TEXT PRIMARY KEY, record TEXT NOT NULL,"
        " expires_at REAL);"
        "CREATE TABLE bgplus_leases (owner TEXT PRIMARY KEY, expires_at REAL NOT NULL);"
    )
    written: dict[str, Any] = {
        "task_id": "a" * 32,
        "name": "app.send",
        "status": "failed",
        "created_at": "2026-01-02T03:04:05.678901+00:00",
        "started_at": None,
        "finished_at": None,
        "duration_s": None,
        "error": "ValueError",
        "attempts": 1,
        "owner": "1-00",
    }
    old.execute("INSERT INTO bgplus_tasks VALUES (?, ?, NULL)", ("a" * 32, json.dumps(written)))
    old.commit()
    old.close()
    store = SQLiteStore(path)
    try:
        assert await store.get("a" * 32) == written
        assert await store.query(statuses={"failed"}, name="app.send") == [written]
        since = datetime.fromisoformat(written["created_at"]).timestamp()
        assert await store.query(since=since - 0.001) == [written]
        assert await store.query(since=since + 0.001) == []
    finally:
        await store.aclose()
