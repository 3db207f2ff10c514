"""`TaskHandle`: id, name, status, timestamps, `wait()` and `to_dict()` (issue 2)."""

from __future__ import annotations

import functools
import json
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest

from fastapi_bgplus import TaskHandle, TaskStatus, TrackedBackgroundTasks

pytestmark = pytest.mark.anyio

SECRET = "pw-Zx81secret"


async def send_email(address: str, *, token: str) -> None:
    pass


def write_audit(entry: str) -> None:
    pass


async def fail_with(message: str) -> None:
    raise ValueError(message)


class Mailer:
    async def send(self, address: str) -> None:
        pass


class Notifier:
    def __call__(self, address: str) -> None:
        pass


def test_task_ids_are_32_lowercase_hex_and_unique() -> None:
    tasks = TrackedBackgroundTasks()
    handles = [tasks.add_task(write_audit, "x") for _ in range(2000)]
    for handle in handles:
        assert re.fullmatch(r"[0-9a-f]{32}", handle.task_id), handle.task_id
    assert len({handle.task_id for handle in handles}) == len(handles)


def test_name_is_module_and_qualname() -> None:
    tasks = TrackedBackgroundTasks()
    mailer = Mailer()
    expected = {
        f"{__name__}.send_email": tasks.add_task(send_email, "a@example.com", token=SECRET),
        f"{__name__}.write_audit": tasks.add_task(write_audit, "entry"),
        f"{__name__}.Mailer.send": tasks.add_task(mailer.send, "a@example.com"),
        f"{__name__}.Notifier": tasks.add_task(Notifier(), "a@example.com"),
        "builtins.print": tasks.add_task(print, "hello"),
    }
    for name, handle in expected.items():
        assert handle.name == name


def test_name_unwraps_functools_partial() -> None:
    tasks = TrackedBackgroundTasks()
    once = functools.partial(send_email, "a@example.com")
    twice = functools.partial(once, token=SECRET)
    assert tasks.add_task(once, token=SECRET).name == f"{__name__}.send_email"
    assert tasks.add_task(twice).name == f"{__name__}.send_email"
    assert tasks.add_task(functools.partial(Notifier(), "x")).name == f"{__name__}.Notifier"


def test_name_of_a_lambda_is_its_qualname() -> None:
    handle = TrackedBackgroundTasks().add_task(lambda: None)
    assert handle.name == f"{__name__}.test_name_of_a_lambda_is_its_qualname.<locals>.<lambda>"


def test_status_is_a_str_enum() -> None:
    assert issubclass(TaskStatus, str)
    assert [status.value for status in TaskStatus] == [
        "pending",
        "running",
        "done",
        "failed",
        "cancelled",
        "lost",
    ]
    status: TaskStatus = TaskStatus("done")
    assert status == "done"
    assert status is TaskStatus.DONE
    assert str(TaskStatus.FAILED) == "failed"
    assert f"{TaskStatus.CANCELLED}" == "cancelled"
    assert json.dumps({"status": TaskStatus.RUNNING}) == '{"status": "running"}'


def test_a_new_handle_is_pending_with_no_start_or_end() -> None:
    before = datetime.now(timezone.utc)
    handle = TrackedBackgroundTasks().add_task(write_audit, "entry")
    after = datetime.now(timezone.utc)
    assert handle.status == "pending"
    assert handle.status is TaskStatus.PENDING
    assert not handle.finished
    assert handle.error is None
    assert handle.started_at is None
    assert handle.finished_at is None
    assert handle.duration_s is None
    assert handle.created_at.utcoffset() == timedelta(0)
    # The wall clock, within rounding to the microsecond.
    slack = timedelta(milliseconds=1)
    assert before - slack <= handle.created_at <= after + slack


async def test_a_done_task_has_ordered_utc_timestamps_and_a_duration() -> None:
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(send_email, "a@example.com", token=SECRET)
    await tasks.run()
    assert handle.status == "done"
    assert handle.finished
    assert handle.error is None
    assert handle.started_at is not None
    assert handle.finished_at is not None
    assert handle.duration_s is not None
    for stamp in (handle.created_at, handle.started_at, handle.finished_at):
        assert stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)
    assert handle.created_at <= handle.started_at <= handle.finished_at
    assert handle.duration_s >= 0
    elapsed = (handle.finished_at - handle.started_at).total_seconds()
    assert elapsed == pytest.approx(handle.duration_s, abs=1e-5)


async def test_duration_comes_from_a_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock jumps back an hour before the task starts, and forward two
    hours while it runs; the timings do not move."""
    real_time = time.time

    def set_the_clock_forward() -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(set_the_clock_forward)
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    await tasks.run()
    monkeypatch.undo()
    assert handle.status == "done"
    assert handle.duration_s is not None
    assert 0 <= handle.duration_s < 3600
    assert handle.started_at is not None
    assert handle.finished_at is not None
    assert handle.created_at <= handle.started_at <= handle.finished_at
    assert handle.finished_at - handle.created_at < timedelta(hours=1)


async def test_a_failed_task_keeps_its_error() -> None:
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(fail_with, "bad input")
    await tasks.run()
    assert handle.status == "failed"
    assert isinstance(handle.error, ValueError)
    assert handle.finished
    assert handle.duration_s is not None
    assert handle.duration_s >= 0


async def test_wait_returns_for_each_end_state() -> None:
    gate = anyio.Event()

    async def held() -> None:
        await gate.wait()

    async def blocks() -> None:
        await anyio.sleep_forever()

    tasks = TrackedBackgroundTasks()
    done = tasks.add_task(held)
    failed = tasks.add_task(fail_with, "bad")
    running = tasks.add_task(blocks)
    never_started = tasks.add_task(held)
    woke: list[tuple[TaskHandle, TaskStatus]] = []

    async def wait_for(handle: TaskHandle) -> None:
        await handle.wait()
        woke.append((handle, handle.status))

    runner = anyio.CancelScope()

    async def run() -> None:
        with runner:
            await tasks.run()

    async with anyio.create_task_group() as tg:
        for handle in (done, failed, running, never_started):
            tg.start_soon(wait_for, handle)
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        gate.set()
        await anyio.wait_all_tasks_blocked()
        assert dict(woke) == {done: TaskStatus.DONE, failed: TaskStatus.FAILED}
        assert running.status == "running"
        runner.cancel()
    assert dict(woke) == {
        done: TaskStatus.DONE,
        failed: TaskStatus.FAILED,
        running: TaskStatus.CANCELLED,
        never_started: TaskStatus.CANCELLED,
    }
    assert never_started.started_at is None
    assert never_started.duration_s is None
    assert never_started.finished_at is not None


async def test_wait_returns_at_once_when_already_finished() -> None:
    tasks = TrackedBackgroundTasks()
    handles = [tasks.add_task(write_audit, "x"), tasks.add_task(fail_with, "y")]
    await tasks.run()
    for handle in handles:
        await handle.wait()
    assert [handle.status for handle in handles] == ["done", "failed"]


def assert_summary(summary: dict[str, Any], handle: TaskHandle) -> str:
    text = json.dumps(summary)
    assert set(summary) == {
        "task_id",
        "name",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "duration_s",
        "error",
        "attempts",
    }
    assert summary["attempts"] == handle.attempts
    assert summary["task_id"] == handle.task_id
    assert summary["name"] == handle.name
    assert summary["status"] == handle.status.value
    assert summary["duration_s"] == handle.duration_s
    assert datetime.fromisoformat(summary["created_at"]) == handle.created_at
    for key in ("started_at", "finished_at"):
        value = getattr(handle, key)
        assert summary[key] == (value.isoformat() if value else None)
        if value:
            assert datetime.fromisoformat(summary[key]).utcoffset() == timedelta(0)
    return text


async def test_to_dict_is_json_without_arguments_or_messages() -> None:
    tasks = TrackedBackgroundTasks()
    done = tasks.add_task(send_email, SECRET, token=SECRET)
    failed = tasks.add_task(fail_with, f"could not reach {SECRET}")
    pending_summary = done.to_dict()
    assert pending_summary["status"] == "pending"
    assert pending_summary["started_at"] is None
    assert pending_summary["duration_s"] is None
    assert_summary(pending_summary, done)
    await tasks.run()

    done_text = assert_summary(done.to_dict(), done)
    assert done.to_dict()["error"] is None
    failed_text = assert_summary(failed.to_dict(), failed)
    assert failed.to_dict()["error"] == "ValueError"
    assert failed.to_dict()["status"] == "failed"
    for text in (done_text, failed_text):
        assert SECRET not in text
        assert "could not reach" not in text


async def test_repr_is_short_and_tells_id_status_and_name() -> None:
    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(send_email, SECRET, token=SECRET)
    assert repr(handle) == f"<TaskHandle {handle.task_id[:6]}… pending {__name__}.send_email>"
    await tasks.run()
    assert repr(handle) == f"<TaskHandle {handle.task_id[:6]}… done {__name__}.send_email>"
    assert SECRET not in repr(handle)


async def test_many_waiters_on_one_handle_all_wake() -> None:
    gate = anyio.Event()

    async def held() -> None:
        await gate.wait()

    tasks = TrackedBackgroundTasks()
    handle = tasks.add_task(held)
    woke: list[int] = []

    async def wait_for(index: int) -> None:
        await handle.wait()
        woke.append(index)

    async with anyio.create_task_group() as tg:
        for index in range(3):
            tg.start_soon(wait_for, index)
        tg.start_soon(tasks.run)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        gate.set()
    assert sorted(woke) == [0, 1, 2]
    assert handle.status == "done"
