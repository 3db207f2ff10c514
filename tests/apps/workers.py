"""An app for `tests/test_workers.py`: uvicorn serves it with several worker
processes, which share the `SQLiteStore` at ``BGPLUS_STORE_PATH``.

``POST /queue?count=N&seconds=S`` queues N tasks that each sleep S seconds
and answers their ids; ``POST /fail`` queues one that raises. Every response
carries the pid of the worker that answered, in ``x-worker-pid``. The lease
lasts ``BGPLUS_LEASE_TTL`` seconds.
"""

from __future__ import annotations

import logging
import os

import anyio
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_bgplus import BackgroundTasks, SQLiteStore, TaskTracker

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

tracker = TaskTracker(
    store=SQLiteStore(os.environ["BGPLUS_STORE_PATH"]),
    lease_ttl=float(os.environ.get("BGPLUS_LEASE_TTL", "30")),
    drain_timeout=1.0,
)
app = FastAPI(lifespan=tracker.lifespan)
app.include_router(tracker.router(prefix="/tasks"))


class WorkerPid:
    """Says which worker answered, in an ``x-worker-pid`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.header = (b"x-worker-pid", str(os.getpid()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_pid)


app.add_middleware(WorkerPid)


async def sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


async def fail() -> None:
    raise ValueError("this task always fails")


@app.get("/health")
async def health() -> str:
    return "ok"


@app.post("/queue")
async def queue(count: int, seconds: float, tasks: BackgroundTasks) -> list[str]:
    return [tasks.add_task(sleep, seconds).task_id for _ in range(count)]


@app.post("/fail")
async def queue_failing(tasks: BackgroundTasks) -> str:
    return tasks.add_task(fail).task_id
