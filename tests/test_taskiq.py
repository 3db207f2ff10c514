"""taskiq tasks through `add_task` (issue 11), with taskiq's in-memory broker:
the glue in `fastapi_bgplus.taskiq` end to end in one process. The same with a
real Redis and a real worker process is in tests/test_taskiq_redis.py.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from taskiq import InMemoryBroker, SendTaskError, TaskiqMessage, TaskiqMiddleware, TaskiqResult

from fastapi_bgplus import BackgroundTasks, MemoryStore, TaskTracker, TrackedBackgroundTasks
from fastapi_bgplus._store import Record
from fastapi_bgplus.taskiq import QUEUED, TrackingMiddleware

from ._servers import free_port
from ._subprocess import run_python
from .apps.memory import request_tasks
from .conftest import NEEDS_TASKIQ_REDIS_1_1, Sent

# taskiq's brokers run on asyncio; trio is refused (see the trio tests below).
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)


class RecordingStore(MemoryStore):
    """A `MemoryStore` that keeps every status written, per task, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[Record] = []
        self.renewals = 0

    @functools.cached_property
    def renewed(self) -> anyio.Event:
        """Set once the lease is renewed after startup. Made on first use, in
        the event loop: older anyio (4.1.0, the floor) cannot make an `Event`
        outside one."""
        return anyio.Event()

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        self.writes.extend(records)
        await super().put(records, history_ttl=history_ttl)

    async def renew_lease(self, owner: str, ttl: float) -> None:
        if owner != QUEUED:
            self.renewals += 1
            if self.renewals > 1:  # renewed after the one at startup
                self.renewed.set()
        await super().renew_lease(owner, ttl)

    def statuses(self, task_id: str) -> list[str]:
        return [r["status"] for r in self.writes if r["task_id"] == task_id]


class BrokenStore(MemoryStore):
    """A store whose every call fails, as when Redis is down."""

    async def put(self, records: Sequence[Record], *, history_ttl: float | None) -> None:
        raise ConnectionError("store down")

    async def get(self, task_id: str) -> Record | None:
        raise ConnectionError("store down")

    async def renew_lease(self, owner: str, ttl: float) -> None:
        raise ConnectionError("store down")


class World:
    """A FastAPI app, its tracker, and a taskiq broker (in memory) with the
    tracking middleware, as a real deployment wires them."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else RecordingStore()
        self.middleware = TrackingMiddleware(self.store)
        self.broker = InMemoryBroker(await_inplace=True).with_middlewares(self.middleware)
        self.ran: list[str] = []
        self.tracker = TaskTracker()

        @self.broker.task
        async def greet(name: str) -> None:
            self.ran.append(name)

        @self.broker.task
        async def explode(name: str) -> None:
            raise ValueError(f"secret {name}")

        self.greet = greet
        self.explode = explode

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            await self.broker.startup()
            yield
            await self.broker.shutdown()

        self.app = app = FastAPI(lifespan=self.tracker.wrap(lifespan))

        @app.post("/greet")
        async def post_greet(name: str, tasks: BackgroundTasks, fail: bool = False) -> str:
            handle = tasks.add_task(self.explode if fail else self.greet, name)
            assert name not in self.ran  # not sent yet: after the response
            return handle.task_id

        @app.post("/boom")
        async def boom(tasks: BackgroundTasks) -> None:
            tasks.add_task(self.greet, "never")
            raise HTTPException(status_code=409)


@pytest.fixture
def world() -> World:
    return World()


def test_a_taskiq_task_is_sent_after_the_response_with_the_handle_id(
    world: World, sent: list[Sent]
) -> None:
    with TestClient(world.app) as client:
        task_id = client.post("/greet", params={"name": "ada-Zx81"}).json()
        assert world.ran == ["ada-Zx81"]
        assert world.tracker.in_flight == []
        # Handed off: the store answers for it now, not this process.
        assert world.tracker.get(task_id) is None
    store = world.store
    assert isinstance(store, RecordingStore)
    assert store.statuses(task_id) == ["pending", "running", "done"]
    record = store.records[task_id]
    assert record["name"] == world.greet.task_name
    assert record["attempts"] == 1
    assert record["owner"] == world.middleware.owner
    # While it waits in the queue, the queue's lease, not the sender's, owns it.
    (pending,) = [r for r in store.writes if r["task_id"] == task_id and r["status"] == "pending"]
    assert pending["owner"] == QUEUED
    assert QUEUED in store.leases
    assert record["duration_s"] >= 0
    # When it was sent, not when the worker took it.
    assert {r["created_at"] for r in store.writes if r["task_id"] == task_id} == {
        record["created_at"]
    }
    assert [(s.signal, s.sender, s.kwargs["task_id"]) for s in sent] == [
        ("task_started", world.broker, task_id),
        ("task_completed", world.broker, task_id),
    ]
    assert sent[1].kwargs["func"] is world.greet
    assert "ada-Zx81" not in repr(store.writes)  # never the arguments


def test_a_failing_taskiq_task_is_reported_failed_in_the_worker(
    world: World, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(world.app) as client:
        task_id = client.post("/greet", params={"name": "ada", "fail": True}).json()
    store = world.store
    assert isinstance(store, RecordingStore)
    assert store.statuses(task_id) == ["pending", "running", "failed"]
    assert store.records[task_id]["error"] == "ValueError"
    assert [s.signal for s in sent] == ["task_started", "task_failed"]
    assert isinstance(sent[1].kwargs["error"], ValueError)
    ours = [r for r in caplog.records if r.name == "fastapi_bgplus"]
    assert any(task_id in r.getMessage() for r in ours)
    assert "secret ada" not in repr(store.writes)


def test_a_failed_request_never_sends_its_taskiq_task(
    world: World, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(world.app) as client:
        assert client.post("/boom").status_code == 409
    assert world.ran == []
    assert world.store.records == {}  # not even `pending`: never sent
    (abandoned,) = sent
    assert abandoned.signal == "task_abandoned"
    assert abandoned.kwargs["handle"].status == "cancelled"


def test_the_drain_does_not_wait_for_handed_off_tasks(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")
    with TestClient(world.app) as client:
        client.post("/greet", params={"name": "ada"})
    (summary,) = [r.getMessage() for r in caplog.records if "drained" in r.getMessage()]
    assert "(0 in flight at shutdown)" in summary


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_cut_off_later_tasks_leave_the_handed_off_one_alone(
    world: World, sent: list[Sent]
) -> None:
    await world.broker.startup()
    tasks = TrackedBackgroundTasks.for_request({"type": "http", "app": world.app})
    sent_handle = tasks.add_task(world.greet, "ada")
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    tasks.add_task(forever)
    async with anyio.create_task_group() as group:
        group.start_soon(tasks.run)
        await started.wait()
        group.cancel_scope.cancel()
    await world.broker.shutdown()
    assert [s.signal for s in sent if s.signal == "task_abandoned"] == ["task_abandoned"]
    assert sent_handle.status == "pending"  # sent: its status is the store's
    assert world.ran == ["ada"]


@pytest.mark.anyio
@ASYNCIO_ONLY
@NEEDS_TASKIQ_REDIS_1_1
async def test_a_broker_that_is_down_fails_the_task(
    sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    from taskiq_redis import RedisStreamBroker

    store = RecordingStore()
    broker = RedisStreamBroker(f"redis://127.0.0.1:{free_port()}").with_middlewares(
        TaskiqMiddleware(), TrackingMiddleware(store)
    )

    @broker.task
    async def unreachable(address: str) -> None:  # pragma: no cover  (never delivered)
        pass

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(unreachable, "ada@example.com")
    await tasks.run()
    await broker.connection_pool.aclose()
    assert handle.status == "failed"
    assert isinstance(handle.error, SendTaskError)
    assert store.statuses(handle.task_id) == ["pending", "failed"]
    assert [s.signal for s in sent] == ["task_failed"]
    assert "ada@example.com" not in caplog.text


@pytest.mark.anyio
@ASYNCIO_ONLY
@NEEDS_TASKIQ_REDIS_1_1
async def test_a_broker_down_without_tracking_fails_the_task() -> None:
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(f"redis://127.0.0.1:{free_port()}")

    @broker.task
    async def unreachable() -> None:  # pragma: no cover  (never delivered)
        pass

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(unreachable)
    assert handle.name == unreachable.task_name
    await tasks.run()
    await broker.connection_pool.aclose()
    assert handle.status == "failed"


def test_a_store_that_fails_never_fails_the_task(caplog: pytest.LogCaptureFixture) -> None:
    world = World(BrokenStore())
    with TestClient(world.app) as client:
        client.post("/greet", params={"name": "ada"})
        client.post("/greet", params={"name": "grace"})
    assert world.ran == ["ada", "grace"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # Logged once per lease_ttl, not once per write.
    assert [r.getMessage() for r in warnings] == [
        "The task store failed (ConnectionError); task status is not written until it is back"
    ]


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_the_lease_is_renewed_while_the_broker_runs() -> None:
    store = RecordingStore()
    middleware = TrackingMiddleware(store, lease_ttl=0.03)
    broker = InMemoryBroker().with_middlewares(middleware)
    await broker.startup()
    with anyio.fail_after(5):
        await store.renewed.wait()
    assert await store.lease_alive(middleware.owner)
    await broker.shutdown()
    await broker.shutdown()  # a second shutdown is harmless


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_a_task_delivered_again_counts_one_more_attempt(world: World) -> None:
    await world.broker.startup()
    first = await world.greet.kiq("ada")
    await world.broker.shutdown()
    message = TaskiqMessage(
        task_id=first.task_id, task_name=world.greet.task_name, labels={}, args=["ada"], kwargs={}
    )
    # The worker died mid-run: the store holds `running`; it is delivered again.
    await world.middleware.pre_execute(message)
    await world.middleware.post_execute(
        message, TaskiqResult(is_err=False, return_value=None, execution_time=0.0)
    )
    assert world.store.records[first.task_id]["attempts"] == 2


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_two_deliveries_at_once_report_one_end_each(world: World) -> None:
    message = TaskiqMessage(
        task_id="0" * 32, task_name=world.greet.task_name, labels={}, args=["ada"], kwargs={}
    )
    result: TaskiqResult[None] = TaskiqResult(is_err=True, return_value=None, execution_time=0.0)
    await world.middleware.on_error(message, result, ValueError())  # never started here
    await world.middleware.post_execute(message, result)
    assert world.store.records == {}


def test_trio_refuses_taskiq_tasks_at_add_task_and_run(world: World) -> None:
    async def main() -> None:
        tasks = TrackedBackgroundTasks()
        with pytest.raises(RuntimeError, match="taskiq's brokers run on asyncio"):
            tasks.add_task(world.greet, "ada")
        assert tasks.handles == []
        # Queued from a worker thread, where no event loop is running:
        handle = await anyio.to_thread.run_sync(
            functools.partial(tasks.add_task, world.greet, "ada")
        )
        await tasks.run()
        assert handle.status == "failed"
        assert isinstance(handle.error, RuntimeError)
        assert "taskiq's brokers run on asyncio" in str(handle.error)

    anyio.run(main, backend="trio")
    assert world.ran == []


def test_a_trio_app_refuses_taskiq_tasks_with_a_clear_error(world: World) -> None:
    # No broker startup under trio: the app's lifespan is not used.
    app = FastAPI()

    @app.post("/greet")
    async def post_greet(tasks: BackgroundTasks) -> None:
        tasks.add_task(world.greet, "ada")

    client = TestClient(app, backend="trio", raise_server_exceptions=True)
    with client, pytest.raises(RuntimeError, match="serve the app on asyncio"):
        client.post("/greet")
    assert world.ran == []


def test_without_taskiq_imported_other_callables_are_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "taskiq")
    ran: list[int] = []
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(functools.partial(ran.append, 1))
    anyio.run(tasks.run)
    assert (ran, handle.status) == ([1], "done")


def test_the_request_trace_context_travels_in_the_labels(world: World) -> None:
    from opentelemetry import context, trace

    seen: list[trace.SpanContext] = []
    parent = trace.SpanContext(
        trace_id=0x5CE0E9A56015FEC5AADFA328AE398115,
        span_id=0xAB54A98CEB1F0AD2,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )

    @world.broker.task
    async def traced() -> None:
        seen.append(trace.get_current_span().get_span_context())

    async def main() -> None:
        await world.broker.startup()
        tasks = TrackedBackgroundTasks()
        tasks.add_task(traced)
        token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
        try:
            await tasks.run()
        finally:
            context.detach(token)
        # In the worker, outside the request's context: from the labels only.
        message = TaskiqMessage(
            task_id="1" * 32,
            task_name=traced.task_name,
            labels={"traceparent": f"00-{parent.trace_id:032x}-{parent.span_id:016x}-01"},
            args=[],
            kwargs={},
        )
        await world.middleware.pre_execute(message)
        seen.append(trace.get_current_span().get_span_context())
        await world.middleware.post_execute(
            message, TaskiqResult(is_err=False, return_value=None, execution_time=0.0)
        )
        seen.append(trace.get_current_span().get_span_context())
        await world.broker.shutdown()

    anyio.run(main)
    in_task, in_worker, after = seen
    assert in_task.trace_id == parent.trace_id
    assert in_worker.trace_id == parent.trace_id
    assert in_worker.is_remote
    assert not after.is_valid


def test_import_fastapi_bgplus_never_imports_taskiq() -> None:
    script = """
        import sys
        import fastapi_bgplus
        from fastapi_bgplus import BackgroundTasks, TaskTracker
        import functools

        tasks = fastapi_bgplus.TrackedBackgroundTasks()
        tasks.add_task(functools.partial(print, "ran"))
        assert "taskiq" not in sys.modules, "taskiq was imported"
        assert not any(name.startswith(("taskiq", "redis")) for name in sys.modules)
        import fastapi_bgplus.taskiq
        assert "taskiq" in sys.modules
        print("no taskiq ok")
    """
    assert run_python(script) == "no taskiq ok"


class HeldSend(TaskiqMiddleware):
    """Holds each message at `pre_send` until released: a slow broker."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = anyio.Event()
        self.release = anyio.Event()

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        self.sending.set()
        await self.release.wait()
        return message


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_the_drain_stops_waiting_once_the_task_is_handed_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")
    held = HeldSend()
    store = RecordingStore()
    broker = InMemoryBroker(await_inplace=True).with_middlewares(held, TrackingMiddleware(store))
    ran: list[str] = []

    @broker.task
    async def greet(name: str) -> None:
        ran.append(name)

    tracker = TaskTracker(drain_timeout=math.inf)
    async with anyio.create_task_group() as group:
        async with tracker.lifespan(None) as state:

            async def request() -> None:
                async with request_tasks(state) as tasks:
                    tasks.add_task(greet, "ada")
                    tasks.add_task(greet, "grace")  # two special tasks in one collection

            group.start_soon(request)
            await held.sending.wait()
            assert len(tracker.in_flight) == 2
            # Shutdown starts while the first is being sent: the drain waits
            # for the sends, not for the worker.
            logger = logging.getLogger("fastapi_bgplus")
            handler = ReleaseWhenDraining(held)
            logger.addHandler(handler)
        logger.removeHandler(handler)
        await broker.shutdown()
    assert tracker.in_flight == []
    assert ran == ["ada", "grace"]
    (summary,) = [r.getMessage() for r in caplog.records if "drained" in r.getMessage()]
    assert "(2 in flight at shutdown)" in summary
    assert "0 done, 0 failed, 0 abandoned" in summary


class ReleaseWhenDraining(logging.Handler):
    """Releases the held send once the drain says it waits."""

    def __init__(self, held: HeldSend) -> None:
        super().__init__()
        self.held = held

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Shutting down"):
            self.held.release.set()


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_no_receivers_cost_no_signal_in_the_worker(no_receivers: None) -> None:
    world = World()
    await world.broker.startup()
    await world.greet.kiq("ada")
    await world.broker.shutdown()
    assert world.ran == ["ada"]
    store = world.store
    assert isinstance(store, RecordingStore)
    await store.aclose()
    assert [r["status"] for r in store.writes] == ["pending", "running", "done"]


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_wait_follows_a_handed_off_task_to_its_end_in_the_store(world: World) -> None:
    """Also for a caller already waiting when the task left the process."""
    await world.broker.startup()
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(world.greet, "ada")
    woke: list[str] = []

    async def waiter() -> None:
        await handle.wait()
        woke.append(world.store.records[handle.task_id]["status"])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await tasks.run()
        await handle.wait()
    await world.broker.shutdown()
    assert handle.handed_off
    assert woke == ["done"]


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_wait_polls_the_store_until_the_worker_ends_it_or_is_lost() -> None:
    store = MemoryStore()
    broker = InMemoryBroker().with_middlewares(TrackingMiddleware(store))
    gate = anyio.Event()

    @broker.task
    async def held() -> None:
        await gate.wait()

    await broker.startup()
    with anyio.fail_after(10):
        done, lost = TrackedBackgroundTasks(), TrackedBackgroundTasks()
        first, second = done.add_task(held), lost.add_task(held)
        await done.run()
        await lost.run()
        await anyio.sleep(0.05)  # both taken by the in-memory worker
        # The second's worker "dies": its record keeps a lease nobody renews.
        record = {**(await store.get(second.task_id) or {}), "owner": "a-dead-worker"}
        await store.put([record], history_ttl=None)
        await second.wait()
        gate.set()
        await first.wait()
    await broker.shutdown()
    assert (await store.get(first.task_id) or {})["status"] == "done"


@pytest.mark.anyio
@ASYNCIO_ONLY
async def test_wait_for_a_task_sent_without_tracking_says_how_to_follow_it() -> None:
    broker = InMemoryBroker(await_inplace=True)

    @broker.task
    async def untracked() -> None:
        pass

    await broker.startup()
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(untracked)
    await tasks.run()
    with pytest.raises(RuntimeError, match="has no TrackingMiddleware"):
        await handle.wait()
    await broker.shutdown()


@pytest.mark.anyio
@ASYNCIO_ONLY
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"timeout": 10.0, "attempts": 3}, {"timeout": "10.0", "max_retries": "3"}),
        ({"timeout": 5.0}, {"timeout": "5.0"}),
        ({"attempts": 2}, {"max_retries": "2"}),
    ],
)
async def test_task_options_travel_to_taskiq_as_its_labels(
    options: dict[str, Any], expected: dict[str, str]
) -> None:
    from fastapi_bgplus import task

    class Capture(TaskiqMiddleware):
        def __init__(self) -> None:
            super().__init__()
            self.labels: list[dict[str, Any]] = []

        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            self.labels.append(dict(message.labels))
            return message

    capture = Capture()
    broker = InMemoryBroker(await_inplace=True).with_middlewares(capture)
    ran: list[str] = []

    if options.get("attempts", 1) > 1:
        options = {**options, "retry_on": ConnectionError}

    @task(**options)
    @broker.task
    async def deliver(url: str) -> None:
        ran.append(url)

    await broker.startup()
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(deliver, "https://example.com/hook")
    await tasks.run()
    await broker.shutdown()
    assert handle.handed_off
    assert handle.name == "tests.test_taskiq:deliver"  # taskiq's name for it
    assert ran == ["https://example.com/hook"]  # run by the broker's worker side
    (labels,) = capture.labels
    sent = {key: str(labels[key]) for key in ("timeout", "max_retries") if key in labels}
    assert sent == expected  # as taskiq sends them: strings
    assert ("retry_on_error" in labels) == ("max_retries" in expected)
