"""The blinker signals: arguments, senders, receivers of both kinds, and
receivers that raise (issue 2)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_bgplus import BackgroundTasks, TaskHandle, signals

from .conftest import Sent

pytestmark = pytest.mark.anyio

Connect = Callable[..., None]

ALL = (signals.task_started, signals.task_completed, signals.task_failed, signals.task_abandoned)


async def deliver(address: str) -> None:
    await anyio.lowlevel.checkpoint()


def audit(entry: str) -> None:
    pass


async def bounce(address: str) -> None:
    raise ConnectionError("mailbox full")


def test_the_signals_live_in_the_package_namespace() -> None:
    assert [signal.name for signal in ALL] == [
        "task-started",
        "task-completed",
        "task-failed",
        "task-abandoned",
    ]
    for signal in ALL:
        assert signals.namespace[signal.name] is signal


async def test_each_signal_is_sent_with_its_keyword_arguments(sent: list[Sent]) -> None:
    runner = anyio.CancelScope()

    async def hang() -> None:
        runner.cancel()
        await anyio.sleep_forever()

    tasks = BackgroundTasks()
    done = tasks.add_task(deliver, "a@example.com")
    synced = tasks.add_task(audit, "entry")
    failed = tasks.add_task(bounce, "b@example.com")
    running = tasks.add_task(hang)
    queued = tasks.add_task(deliver, "c@example.com")
    with runner:
        await tasks.run()

    funcs = {done: deliver, synced: audit, failed: bounce, running: hang, queued: deliver}
    assert [(event.signal, event.kwargs["handle"]) for event in sent] == [
        ("task_started", done),
        ("task_completed", done),
        ("task_started", synced),
        ("task_completed", synced),
        ("task_started", failed),
        ("task_failed", failed),
        ("task_started", running),
        ("task_abandoned", running),
        ("task_abandoned", queued),
    ]
    keys = {
        "task_started": {"handle", "task_id", "func"},
        "task_completed": {"handle", "task_id", "func", "duration_s"},
        "task_failed": {"handle", "task_id", "func", "duration_s", "error"},
        "task_abandoned": {"handle", "task_id", "func", "reason"},
    }
    for event in sent:
        handle: TaskHandle = event.kwargs["handle"]
        assert set(event.kwargs) == keys[event.signal]
        assert event.sender is None  # built by hand, bound to no application
        assert event.kwargs["task_id"] == handle.task_id
        assert event.kwargs["func"] is funcs[handle]
        if "duration_s" in event.kwargs:
            assert event.kwargs["duration_s"] == handle.duration_s
            assert event.kwargs["duration_s"] is not None
    failure = next(event for event in sent if event.signal == "task_failed")
    assert failure.kwargs["error"] is failed.error
    assert isinstance(failure.kwargs["error"], ConnectionError)
    for event in sent:
        if event.signal == "task_abandoned":
            assert isinstance(event.kwargs["reason"], str)
            assert event.kwargs["reason"]


async def test_started_is_sent_before_the_task_runs_and_completed_after(
    connect: Connect,
) -> None:
    seen: list[str] = []

    def on_started(sender: Any, *, handle: TaskHandle, **kwargs: Any) -> None:
        seen.append(f"started:{handle.status}")

    def on_completed(sender: Any, *, handle: TaskHandle, **kwargs: Any) -> None:
        seen.append(f"completed:{handle.status}")

    connect(signals.task_started, on_started)
    connect(signals.task_completed, on_completed)
    tasks = BackgroundTasks()
    tasks.add_task(lambda: seen.append("task"))
    await tasks.run()
    assert seen == ["started:running", "task", "completed:done"]


async def test_async_receivers_are_awaited(connect: Connect) -> None:
    seen: list[str] = []

    async def on_started(sender: Any, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append("async receiver")

    async def on_failed(sender: Any, *, error: BaseException, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(f"failed:{type(error).__name__}")

    connect(signals.task_started, on_started)
    connect(signals.task_failed, on_failed)
    tasks = BackgroundTasks()
    tasks.add_task(lambda: seen.append("task"))
    tasks.add_task(bounce, "x@example.com")
    await tasks.run()
    assert seen == ["async receiver", "task", "async receiver", "failed:ConnectionError"]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_receiver_that_raises_is_logged_and_skipped(
    is_async: bool, connect: Connect, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    async def broken_async(sender: Any, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("receiver bug")

    for signal in ALL:
        connect(signal, broken_async if is_async else broken)

    ran: list[str] = []
    runner = anyio.CancelScope()

    async def cancel() -> None:
        runner.cancel()
        await anyio.sleep_forever()

    tasks = BackgroundTasks()
    first = tasks.add_task(lambda: ran.append("first"))
    failing = tasks.add_task(bounce, "x@example.com")
    after = tasks.add_task(lambda: ran.append("after"))
    cut = tasks.add_task(cancel)
    with runner:
        await tasks.run()

    assert ran == ["first", "after"]
    assert [first.status, failing.status, after.status, cut.status] == [
        "done",
        "failed",
        "done",
        "cancelled",
    ]
    # The healthy receiver heard everything despite its broken neighbour.
    assert [event.signal for event in sent] == [
        "task_started",
        "task_completed",
        "task_started",
        "task_failed",
        "task_started",
        "task_completed",
        "task_started",
        "task_abandoned",
    ]
    receiver_errors = [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and "Receiver" in record.getMessage()
    ]
    assert len(receiver_errors) == len(sent)
    name = (broken_async if is_async else broken).__qualname__
    for record in receiver_errors:
        assert record.name == "fastapi_bgplus"
        assert name in record.getMessage()
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
    assert {record.getMessage().split("'")[1] for record in receiver_errors} == {
        "task-started",
        "task-completed",
        "task-failed",
        "task-abandoned",
    }


@pytest.mark.usefixtures("no_receivers")
async def test_with_no_receiver_connected_tasks_end_the_same(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = anyio.CancelScope()

    async def hang() -> None:
        runner.cancel()
        await anyio.sleep_forever()

    tasks = BackgroundTasks()
    handles = [
        tasks.add_task(deliver, "a@example.com"),
        tasks.add_task(bounce, "b@example.com"),
        tasks.add_task(hang),
        tasks.add_task(audit, "never"),
    ]
    with runner:
        await tasks.run()
    assert [handle.status for handle in handles] == ["done", "failed", "cancelled", "cancelled"]
    logged = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert [(level, message.split()[2]) for level, message in logged] == [
        ("ERROR", handles[1].task_id),
        ("WARNING", handles[2].task_id),
        ("WARNING", handles[3].task_id),
    ]


def make_app(name: str) -> FastAPI:
    app = FastAPI(title=name)

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(audit, name).task_id}

    return app


def test_the_sender_is_the_application(
    connect: Connect, anyio_backend: Literal["asyncio", "trio"]
) -> None:
    first, second = make_app("first"), make_app("second")
    heard: dict[str, list[tuple[Any, str]]] = {"first": [], "second": []}

    def on_first(sender: Any, *, task_id: str, **kwargs: Any) -> None:
        heard["first"].append((sender, task_id))

    def on_second(sender: Any, *, task_id: str, **kwargs: Any) -> None:
        heard["second"].append((sender, task_id))

    connect(signals.task_completed, on_first, sender=first)
    connect(signals.task_completed, on_second, sender=second)
    with TestClient(first, backend=anyio_backend) as client:
        first_id = client.post("/").json()["task_id"]
    with TestClient(second, backend=anyio_backend) as client:
        second_ids = [client.post("/").json()["task_id"] for _ in range(2)]
    assert heard == {
        "first": [(first, first_id)],
        "second": [(second, task_id) for task_id in second_ids],
    }
