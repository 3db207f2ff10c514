"""A small sign-up service that does its slow work in the background.

Run it with ``./scripts/example`` (or ``uvicorn examples.app:app``), then::

    curl -X POST localhost:8000/users -H 'content-type: application/json' \\
         -d '{"email": "ada@example.com"}'
    curl localhost:8000/tasks/<one of the task ids it returned>
    curl localhost:8000/stats

Each sign-up queues three tasks: a welcome e-mail (async), an audit-log write
(a blocking `def`, run on fastapi-bgplus's own thread limiter) and a webhook
that always fails, to show that a failing task harms neither the response nor
the tasks around it. A signal receiver counts failures per task function.

With several workers, give them a shared task store, so that every worker
answers for every task id::

    BGPLUS_STORE=sqlite:///tmp/tasks.db uvicorn examples.app:app --workers 4
    BGPLUS_STORE=redis://localhost:6379/0 uvicorn examples.app:app --workers 4  # pip install redis
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI
from pydantic import BaseModel, Field

import fastapi_bgplus
from fastapi_bgplus import BackgroundTasks, SQLiteStore, TaskStore, TaskTracker, signals

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


class Mailer:
    """Stands in for an SMTP or e-mail API client."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_welcome(self, address: str) -> None:
        await anyio.sleep(0.05)  # the network round trip
        self.sent.append(address)


class AuditLog:
    """Stands in for a blocking database driver."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self._lock = threading.Lock()

    def write(self, event: str) -> None:
        with self._lock:
            self.entries.append(event)


class WebhookDown(Exception):
    pass


async def notify_crm(user_id: int) -> None:
    raise WebhookDown("crm.example.com answered 503")


failures: Counter[str] = Counter()


@signals.task_failed.connect
def count_failure(sender: Any, *, handle: Any, **kwargs: Any) -> None:
    failures[handle.name] += 1


def store_from_url(url: str | None) -> TaskStore | None:
    """The task store named by `url` (``BGPLUS_STORE``): ``sqlite:///path/to/file.db``
    or ``redis://host:port/db``; none if empty."""
    if not url:
        return None
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SQLiteStore(urlsplit(url).path)
    if scheme in ("redis", "rediss", "unix"):
        store: TaskStore = fastapi_bgplus.RedisStore(url)  # imports redis only now
        return store
    raise ValueError(
        f"BGPLUS_STORE={url!r} names no known store; use sqlite:///path/to/tasks.db"
        f" or redis://host:6379/0"
    )


mailer = Mailer()
audit = AuditLog()
tracker = TaskTracker(drain_timeout=10.0, store=store_from_url(os.environ.get("BGPLUS_STORE")))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    yield {"mailer": mailer, "audit": audit}


app = FastAPI(title="fastapi-bgplus example", lifespan=tracker.wrap(lifespan))
app.include_router(tracker.router(prefix="/tasks", tags=["tasks"]))


class SignUp(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", examples=["ada@example.com"])


_next_id = itertools.count(1)


@app.post("/users", status_code=201)
async def create_user(body: SignUp, tasks: BackgroundTasks) -> dict[str, Any]:
    user_id = next(_next_id)
    welcome = tasks.add_task(mailer.send_welcome, body.email)
    audited = tasks.add_task(audit.write, f"user {user_id} signed up")
    webhook = tasks.add_task(notify_crm, user_id)
    return {
        "user_id": user_id,
        "tasks": {
            "welcome_email": welcome.task_id,
            "audit": audited.task_id,
            "crm_webhook": webhook.task_id,
        },
    }


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {
        "emails_sent": len(mailer.sent),
        "audit_entries": len(audit.entries),
        "failures": dict(failures),
        "in_flight": [handle.to_dict() for handle in tracker.in_flight],
    }
