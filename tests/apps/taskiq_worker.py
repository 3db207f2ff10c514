"""A taskiq broker and task for tests/test_taskiq_redis.py, configured from the
environment (the web app in tests/apps/taskiq_app.py builds the same one).

``taskiq worker tests.apps.taskiq_worker:from_env`` runs it. Environment:
``REDIS_URL``; ``BGPLUS_QUEUE``, the stream (and the store's key prefix);
``BGPLUS_MARKERS``, a directory where the task appends ``start KEY`` and
``end KEY`` to ``runs.log`` (and the trace id it runs under to ``trace.log``),
signal receivers append ``SIGNAL TASK_ID`` to ``signals.log``, and the worker
writes ``ready.PID`` once started; ``BGPLUS_LEASE_TTL``, seconds;
``BGPLUS_BROKER=reclaiming`` for `ReclaimingRedisStreamBroker` instead of
taskiq-redis's own.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any

from opentelemetry import trace
from taskiq import AsyncTaskiqDecoratedTask, TaskiqEvents, TaskiqState
from taskiq_redis import RedisStreamBroker

from fastapi_bgplus import RedisStore, signals
from fastapi_bgplus.taskiq import TrackingMiddleware
from fastapi_bgplus.taskiq_redis import ReclaimingRedisStreamBroker

IDLE_TIMEOUT_MS = 3000
"""How long a delivered, unacknowledged message waits before another worker takes it."""


def append(path: Path, line: str) -> None:
    # One write() of a short line in append mode: whole lines, even across processes.
    with path.open("a") as file:
        file.write(line + "\n")


class Setup:
    def __init__(self) -> None:
        self.url = os.environ["REDIS_URL"]
        self.queue = os.environ["BGPLUS_QUEUE"]
        self.markers = Path(os.environ["BGPLUS_MARKERS"])
        self.store = RedisStore(self.url, prefix=f"{self.queue}:")
        self.middleware = TrackingMiddleware(
            self.store, lease_ttl=float(os.environ.get("BGPLUS_LEASE_TTL", "30"))
        )
        broker: type[RedisStreamBroker] = RedisStreamBroker
        if os.environ.get("BGPLUS_BROKER") == "reclaiming":
            broker = ReclaimingRedisStreamBroker
        self.broker = broker(
            self.url,
            queue_name=self.queue,
            consumer_group_name=self.queue,
            idle_timeout=IDLE_TIMEOUT_MS,
            unacknowledged_lock_timeout=1.0,
            xread_block=200,
        ).with_middlewares(self.middleware)
        markers = self.markers

        async def run_work(key: str, seconds: float = 0.0, fail: bool = False) -> None:
            runs = markers / "runs.log"
            append(runs, f"start {key}")
            trace_id = trace.get_current_span().get_span_context().trace_id
            if trace_id:
                append(markers / "trace.log", f"{key} {trace_id:032x}")
            await asyncio.sleep(seconds)
            if fail:
                raise ValueError(f"{key} failed")
            append(runs, f"end {key}")

        async def work(key: str, seconds: float = 0.0, fail: bool = False) -> None:
            await run_work(key, seconds, fail)

        self.run_work = run_work  # in-process
        self.work: AsyncTaskiqDecoratedTask[[str, float, bool], Any] = self.broker.task(
            task_name="tests.work"
        )(work)


def from_env() -> RedisStreamBroker:
    """The worker's broker: the task, and receivers that log its signals."""
    setup = Setup()
    log = setup.markers / "signals.log"

    def heard(name: str, sender: Any, *, task_id: str, **kwargs: Any) -> None:
        append(log, f"{name} {task_id}")

    for signal in (signals.task_started, signals.task_completed, signals.task_failed):
        name = signal.name.replace("-", "_")
        signal.connect(functools.partial(heard, name), sender=setup.broker, weak=False)

    @setup.broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def ready(state: TaskiqState) -> None:
        append(setup.markers / f"ready.{os.getpid()}", "ready")

    return setup.broker
