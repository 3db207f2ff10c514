"""An app for `tests/test_server.py`: uvicorn serves it in a subprocess.

``POST /queue?name=N&seconds=S`` queues an async and a sync task (the sync
one first with ``sync_first=true``) that each sleep `S` seconds, then write a
marker file ``N-async`` / ``N-sync`` in the directory named by
``BGPLUS_MARKERS``; it answers with their ids by function name. ``POST /stubborn`` queues
a task that swallows every cancellation. The drain timeout comes from
``BGPLUS_DRAIN_TIMEOUT`` and the grace from ``BGPLUS_GRACE``; ``BGPLUS_DETACH=1`` turns
detached mode on; ``BGPLUS_HANGING_RECEIVER=1`` connects an async `task_abandoned` receiver
that never returns. The package's log lines go to stderr.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio
from fastapi import FastAPI

from fastapi_bgplus import BackgroundTasks, TaskTracker, signals

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

MARKERS = Path(os.environ["BGPLUS_MARKERS"])

tracker = TaskTracker(
    drain_timeout=float(os.environ.get("BGPLUS_DRAIN_TIMEOUT", "30")),
    shutdown_grace=float(os.environ.get("BGPLUS_GRACE", "5")),
    detach=os.environ.get("BGPLUS_DETACH") == "1",
)
app = FastAPI(lifespan=tracker.lifespan)


if os.environ.get("BGPLUS_HANGING_RECEIVER") == "1":

    @signals.task_abandoned.connect
    async def hangs(sender: object, **kwargs: object) -> None:
        await anyio.sleep_forever()


async def stubborn() -> None:
    while True:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            pass  # swallowed, every time


async def write_marker_async(name: str, seconds: float) -> None:
    await anyio.sleep(seconds)
    (MARKERS / f"{name}-async").write_text("done")


def write_marker_sync(name: str, seconds: float) -> None:
    time.sleep(seconds)
    (MARKERS / f"{name}-sync").write_text("done")


@app.get("/health")
async def health() -> str:
    return "ok"


@app.post("/queue")
async def queue(
    name: str, seconds: float, tasks: BackgroundTasks, sync_first: bool = False
) -> dict[str, str]:
    funcs = [write_marker_async, write_marker_sync]
    if sync_first:
        funcs.reverse()
    return {func.__name__: tasks.add_task(func, name, seconds).task_id for func in funcs}


@app.post("/stubborn")
async def queue_stubborn(tasks: BackgroundTasks) -> dict[str, str]:
    return {"id": tasks.add_task(stubborn).task_id}
