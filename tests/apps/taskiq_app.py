"""A web app for tests/test_taskiq_redis.py, served by uvicorn in a subprocess
(``uvicorn --factory tests.apps.taskiq_app:from_env``), with the broker and
task of tests/apps/taskiq_worker.py (same environment).

- ``POST /run?kind=local|taskiq&key=K&seconds=S&fail=F`` queues the same work
  in-process or as a taskiq task; it answers the task id and the handle's
  status at response time. With ``trace=TRACEPARENT`` the request runs in
  that trace context.
- ``POST /batch?n=N&seconds=S`` queues N taskiq tasks (keys b0...); their ids.
- ``POST /boom`` queues a taskiq task, then fails.
- ``GET /tasks/{id}``: ``tracker.router()``, this process's task, else the
  store's record.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry import context
from opentelemetry.propagate import extract

from fastapi_bgplus import BackgroundTasks, TaskTracker

from .taskiq_worker import Setup

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def from_env() -> FastAPI:
    setup = Setup()
    broker = setup.broker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.startup()
        yield
        await broker.shutdown()

    tracker = TaskTracker(store=setup.store, lease_ttl=setup.middleware.lease_ttl)
    app = FastAPI(lifespan=tracker.wrap(lifespan))

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.post("/run")
    async def run(
        kind: str,
        key: str,
        tasks: BackgroundTasks,
        seconds: float = 0.0,
        fail: bool = False,
        trace: str | None = None,
    ) -> dict[str, str]:
        if trace is not None:
            # Left attached: the request's context, where its tasks are sent from.
            context.attach(extract({"traceparent": trace}))
        func = setup.work if kind == "taskiq" else setup.run_work
        handle = tasks.add_task(func, key, seconds, fail)
        return {"task_id": handle.task_id, "status": handle.status.value}

    @app.post("/batch")
    async def batch(n: int, tasks: BackgroundTasks, seconds: float = 0.0) -> list[str]:
        return [tasks.add_task(setup.work, f"b{i}", seconds, False).task_id for i in range(n)]

    @app.post("/boom")
    async def boom(tasks: BackgroundTasks) -> None:
        tasks.add_task(setup.work, "boom", 0.0, False)
        raise RuntimeError("the request failed")

    app.include_router(tracker.router(prefix="/tasks"))
    return app
