"""The public API's types as users write them; mypy checks this file, pytest does not run it.

Each `# type: ignore[...]` marks a mistake mypy must catch: were the check to
stop working, `warn_unused_ignores` (part of `--strict`) would flag the line.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.responses import JSONResponse

from fastapi_bgplus import (
    BackgroundTasks,
    MemoryStore,
    SQLiteStore,
    TaskHandle,
    TaskStatus,
    TaskStore,
    TaskTracker,
    TrackedBackgroundTasks,
    current_thread_limiter,
    signals,
)

app = FastAPI(lifespan=TaskTracker(drain_timeout=5.0).lifespan)


async def send_email(address: str, *, subject: str = "Welcome") -> None: ...


def write_audit(entry: str, level: int) -> None: ...


@app.post("/users")
async def create_user(email: str, tasks: BackgroundTasks) -> dict[str, str]:
    handle: TaskHandle = tasks.add_task(send_email, email, subject="Hi")
    tasks.add_task(write_audit, "signed up", 20)
    tasks.add_task(functools.partial(write_audit, "partial"), level=10)
    tasks.add_task(send_email, 42)  # type: ignore[arg-type]
    tasks.add_task(send_email, email, subject=None)  # type: ignore[arg-type]
    tasks.add_task(write_audit, "missing level")  # type: ignore[call-arg]
    tasks.add_task(send_email, email, sender="me")  # type: ignore[call-arg]
    return {"task_id": handle.task_id}


async def by_hand() -> JSONResponse:
    tasks = BackgroundTasks(tasks=[BackgroundTask(write_audit, "x", 1)])
    collection: TrackedBackgroundTasks = tasks
    starlette_view: StarletteBackgroundTasks = tasks
    handles: list[TaskHandle] = collection.handles
    handle = tasks.add_task(send_email, "a@example.com")
    await handle.wait()
    status: TaskStatus = handle.status
    created: datetime = handle.created_at
    started: datetime | None = handle.started_at
    duration: float | None = handle.duration_s
    error: BaseException | None = handle.error
    summary: dict[str, Any] = handle.to_dict()
    task_id: str = handle.task_id
    current_thread_limiter().total_tokens = 10
    print(starlette_view, handles, status, created, started, duration, error, summary, task_id)
    return JSONResponse({}, background=tasks)


async def run_it() -> None:
    tasks = BackgroundTasks()
    await tasks()
    await tasks.run()


@signals.task_failed.connect_via(app)
def count_failure(sender: Any, **kwargs: Any) -> None: ...


class DictStore:
    """A user's own store: the protocol's five methods, nothing to inherit."""

    async def put(self, records: Sequence[dict[str, Any]], *, history_ttl: float | None) -> None:
        pass

    async def get(self, task_id: str) -> dict[str, Any] | None: ...

    async def renew_lease(self, owner: str, ttl: float) -> None: ...

    async def lease_alive(self, owner: str) -> bool:
        return True

    async def aclose(self) -> None: ...


class NoLeases:
    async def get(self, task_id: str) -> dict[str, Any] | None: ...


async def stores() -> None:
    shared: TaskStore = SQLiteStore("/var/lib/myapp/tasks.db", busy_timeout=2.0)
    tracker = TaskTracker(store=shared, lease_ttl=10.0)
    TaskTracker(store=MemoryStore())
    TaskTracker(store=DictStore())
    TaskTracker(store=NoLeases())  # type: ignore[arg-type]
    record: dict[str, Any] | None = await tracker.lookup("0" * 32)
    local: TaskHandle | None = tracker.get("0" * 32)
    print(record, local)
