"""The server that `benchmarks/load.py` drives; not meant to be run by hand.

Every task it queues leaves a trace in a real shared sink, an SQLite database
in WAL mode (path in ``BGPLUS_LOAD_SINK``, tables made by `load.py`):

- ``queued(task_id, kind)``: written by the endpoint right after `add_task()`;
- ``outcomes(task_id, outcome)``: written by the task's own body, ``done`` at
  its end or ``failed`` just before it raises;
- ``events(task_id, signal)``: written by a receiver of ``task_completed``,
  ``task_failed`` and ``task_abandoned``.

Abandoned tasks are also named in the WARNING lines on stderr. With
``BGPLUS_LOAD_FAULTS=1`` a second receiver raises on every 7th signal it gets.
``BGPLUS_LOAD_DRAIN`` sets the tracker's drain timeout (seconds).

A task kind is one letter: ``a`` async, ``s`` sync (both succeed), ``f`` async
and ``g`` sync (both raise), ``w`` async and ``z`` sync (both slow).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import sqlite3
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
from fastapi import FastAPI, Request
from pydantic import BaseModel

from fastapi_bgplus import BackgroundTasks, TaskTracker, signals

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

SINK = os.environ["BGPLUS_LOAD_SINK"]
FAULTS = os.environ.get("BGPLUS_LOAD_FAULTS") == "1"
DRAIN_TIMEOUT = float(os.environ.get("BGPLUS_LOAD_DRAIN", "30"))

_local = threading.local()
# One writer at a time, handed over by a lock: SQLite's own busy handler
# sleeps for milliseconds when writers collide, and under load the tasks
# would then fall ever further behind the requests.
_write_lock = threading.Lock()


def db() -> sqlite3.Connection:
    """This thread's connection to the sink (sqlite3 connections are per thread)."""
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(SINK, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Up to 40 worker threads each hold a connection: keep each one's page
        # cache small, so the server's RSS shows the package, not the sink.
        conn.execute("PRAGMA cache_size=-128")
        _local.conn = conn
    return conn


def write(table: str, task_id: str, value: str) -> None:
    conn = db()
    with _write_lock:
        conn.execute(f"INSERT INTO {table} VALUES (?, ?)", (task_id, value))


class TaskFailedOnPurpose(Exception):
    pass


# Each task gets a one-item list that holds its own id once add_task() returned.


async def async_task(box: list[str], payload: str) -> None:
    await anyio.lowlevel.checkpoint()
    write("outcomes", box[0], "done")


def sync_task(box: list[str], payload: str) -> None:
    write("outcomes", box[0], "done")


async def async_failing(box: list[str], payload: str) -> None:
    await anyio.lowlevel.checkpoint()
    write("outcomes", box[0], "failed")
    raise TaskFailedOnPurpose("on purpose")


def sync_failing(box: list[str], payload: str) -> None:
    write("outcomes", box[0], "failed")
    raise TaskFailedOnPurpose("on purpose")


async def async_slow(box: list[str], payload: str) -> None:
    await anyio.sleep(random.uniform(0.2, 3.0))
    write("outcomes", box[0], "done")


def sync_slow(box: list[str], payload: str) -> None:
    time.sleep(0.2)
    write("outcomes", box[0], "done")


KINDS: dict[str, Any] = {
    "a": async_task,
    "s": sync_task,
    "f": async_failing,
    "g": sync_failing,
    "w": async_slow,
    "z": sync_slow,
}

tracker = TaskTracker(drain_timeout=DRAIN_TIMEOUT)
app = FastAPI(lifespan=tracker.lifespan)


def record_event(name: str) -> Any:
    def receiver(sender: Any, *, task_id: str, **kwargs: Any) -> None:
        write("events", task_id, name)

    return receiver


_receivers = [
    (signals.task_completed, record_event("completed")),
    (signals.task_failed, record_event("failed")),
    (signals.task_abandoned, record_event("abandoned")),
]
for _signal, _receiver in _receivers:
    _signal.connect(_receiver, sender=app, weak=False)

if FAULTS:
    _count = itertools.count(1)

    def every_seventh_raises(sender: Any, **kwargs: Any) -> None:
        if next(_count) % 7 == 0:
            raise RuntimeError("receiver fault on purpose")

    for _signal in (
        signals.task_started,
        signals.task_completed,
        signals.task_failed,
        signals.task_abandoned,
    ):
        _signal.connect(every_seventh_raises, sender=app, weak=False)


def queue(tasks: Any, plan: str, payload: str) -> list[str]:
    ids = []
    for kind in plan:
        box: list[str] = []
        handle = tasks.add_task(KINDS[kind], box, payload)
        box.append(handle.task_id)
        write("queued", handle.task_id, kind)
        ids.append(handle.task_id)
    return ids


class Job(BaseModel):
    plan: str
    payload: str


@app.post("/work")
async def work(job: Job, tasks: BackgroundTasks) -> dict[str, list[str]]:
    return {"ids": queue(tasks, job.plan, job.payload)}


@app.post("/work-then-read")
async def work_then_read(request: Request, plan: str, tasks: BackgroundTasks) -> dict[str, Any]:
    """Queues first, then reads the body: a client gone mid-body fails the request."""
    ids = queue(tasks, plan, "")
    body = await request.body()
    return {"ids": ids, "read": len(body)}


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/stats")
async def stats() -> dict[str, int]:
    return {"in_flight": len(tracker.in_flight), "threads": threading.active_count()}
