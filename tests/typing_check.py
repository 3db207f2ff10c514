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
    RedisStore,
    SQLiteStore,
    TaskHandle,
    TaskStatus,
    TaskStore,
    TaskTracker,
    TrackedBackgroundTasks,
    current_thread_limiter,
    signals,
    task,
)

app = FastAPI(lifespan=TaskTracker(drain_timeout=5.0).lifespan)


async def redis_store() -> dict[str, Any] | None:
    store = RedisStore("redis://localhost:6379/0", prefix="myapp:")
    await store.put([{"task_id": "x", "status": "done", "owner": "w1"}], history_ttl=3600.0)
    record: dict[str, Any] | None = await store.get("x")
    alive: bool = await store.lease_alive("w1")
    await store.aclose()
    RedisStore(b"redis://localhost")  # type: ignore[arg-type]
    print(alive)
    return record


async def send_email(address: str, *, subject: str = "Welcome") -> None: ...


def write_audit(entry: str, level: int) -> None: ...


@task(timeout=10.0, attempts=3, retry_on=(ConnectionError, TimeoutError))
async def deliver_webhook(url: str, *, retries_left: int = 3) -> bool:
    return True


@task(timeout=5)
def render_report(report_id: int) -> str:
    return str(report_id)


@task(retry_on=ConnectionError, attempts=2)
async def ping(url: str) -> None: ...


@app.post("/hooks")
async def hooks(url: str, tasks: BackgroundTasks) -> dict[str, str]:
    handle: TaskHandle = tasks.add_task(deliver_webhook, url, retries_left=1)
    tasks.add_task(render_report, 7)
    tasks.add_task(ping, url)
    tasks.add_task(deliver_webhook, 42)  # type: ignore[arg-type]
    tasks.add_task(render_report)  # type: ignore[call-arg]
    delivered: bool = await deliver_webhook(url)  # calling it directly: the plain function
    text: str = render_report(7)
    render_report("7")  # type: ignore[arg-type]
    print(delivered, text, deliver_webhook.__name__)
    return {"task_id": handle.task_id}


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


# A taskiq task keeps its call site and its argument types.

from taskiq import InMemoryBroker  # noqa: E402

from fastapi_bgplus.taskiq import TrackingMiddleware  # noqa: E402

broker = InMemoryBroker().with_middlewares(TrackingMiddleware(MemoryStore(), lease_ttl=10.0))


@broker.task
async def send_email_later(address: str) -> None: ...


@app.post("/later")
async def later(email: str, tasks: BackgroundTasks) -> str:
    tasks.add_task(send_email_later, 42)  # type: ignore[arg-type]
    return tasks.add_task(send_email_later, email).task_id
