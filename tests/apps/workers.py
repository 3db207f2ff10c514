"""An app for `tests/test_workers.py`: uvicorn serves it with several worker
processes, which share the task store named by ``BGPLUS_STORE``
(``sqlite:///path/to/tasks.db`` or ``redis://host:port/db``).

``POST /queue?count=N&seconds=S`` queues N tasks that each sleep S seconds
and answers their ids; ``POST /fail`` queues one that raises. Every response
carries the pid of the worker that answered, in ``x-worker-pid``. The lease
lasts ``BGPLUS_LEASE_TTL`` seconds.

The console: ``/tasks`` allows cancel, and the dashboard at
``/tasks/dashboard`` asks for HTTP Basic credentials (``ops`` and the
password in ``BGPLUS_CONSOLE_PASSWORD``), the recipe of docs/console.md.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fastapi_bgplus
from fastapi_bgplus import BackgroundTasks, SQLiteStore, TaskStore, TaskTracker

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def store_from_url(url: str) -> TaskStore:
    if url.startswith("sqlite://"):
        return SQLiteStore(url.removeprefix("sqlite://"))
    store: TaskStore = fastapi_bgplus.RedisStore(url)
    return store


tracker = TaskTracker(
    store=store_from_url(os.environ["BGPLUS_STORE"]),
    lease_ttl=float(os.environ.get("BGPLUS_LEASE_TTL", "30")),
    drain_timeout=1.0,
)
app = FastAPI(lifespan=tracker.lifespan)
app.include_router(tracker.router(prefix="/tasks", allow_cancel=True))

basic = HTTPBasic()
PASSWORD = os.environ.get("BGPLUS_CONSOLE_PASSWORD", "change me").encode()


def operator(credentials: Annotated[HTTPBasicCredentials, Depends(basic)]) -> None:
    user_ok = secrets.compare_digest(credentials.username.encode(), b"ops")
    password_ok = secrets.compare_digest(credentials.password.encode(), PASSWORD)
    if not (user_ok and password_ok):
        raise HTTPException(status_code=401, headers={"WWW-Authenticate": "Basic"})


app.include_router(tracker.dashboard("/tasks/dashboard", dependencies=[Depends(operator)]))


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
