"""An app for `tests/test_server.py`: uvicorn serves it in a subprocess.

``POST /queue?name=N&seconds=S`` queues an async and a sync task (the sync
one first with ``sync_first=true``) that each sleep `S` seconds, then write a
marker file ``N-async`` / ``N-sync`` in the directory named by
``BGPLUS_MARKERS``; it answers with their ids by function name. The drain timeout comes from
``BGPLUS_DRAIN_TIMEOUT``; ``BGPLUS_DETACH=1`` turns detached mode on. The package's log lines
go to stderr.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio
from fastapi import FastAPI

from fastapi_bgplus import BackgroundTasks, TaskTracker

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

MARKERS = Path(os.environ["BGPLUS_MARKERS"])

tracker = TaskTracker(
    drain_timeout=float(os.environ.get("BGPLUS_DRAIN_TIMEOUT", "30")),
    detach=os.environ.get("BGPLUS_DETACH") == "1",
)
app = FastAPI(lifespan=tracker.lifespan)


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
