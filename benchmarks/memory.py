"""Memory held by a `TaskTracker`, measured with tracemalloc (issue 4).

Inside the tracker's lifespan, with collections bound to it as the FastAPI
provider binds them:

1. bytes per pending task: one collection with ``--batch`` no-op tasks queued;
2. bytes per finished task kept in the history: the same once they have run;
3. the ceiling: ``--tasks`` tasks (default 100,000), one request-sized
   collection of one task at a time, with the default ``history_size``
   (`fastapi_bgplus.DEFAULT_HISTORY_SIZE`); memory is sampled every tenth of
   the way and must stay flat once the history is full.

Run from the project root::

    .venv/bin/python benchmarks/memory.py        # ~20 s
"""

from __future__ import annotations

import argparse
import gc
import re
import tracemalloc
from collections.abc import Mapping
from typing import Any

import anyio
from _common import print_header, table

from fastapi_bgplus import DEFAULT_HISTORY_SIZE, TaskTracker, TrackedBackgroundTasks


async def noop() -> None:
    return None


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def bound(state: Mapping[str, Any]) -> TrackedBackgroundTasks:
    """A collection bound to the tracker, as get_background_tasks() binds a request's."""
    return TrackedBackgroundTasks.for_request({"type": "http", "state": dict(state)})


async def per_task(batch: int) -> tuple[float, float]:
    """Bytes per pending and per finished (kept in the history) task."""
    tracker = TaskTracker(history_size=batch)
    async with tracker.lifespan(None) as state:
        await warm_up(state)
        before = traced()
        tasks = bound(state)
        for _ in range(batch):
            tasks.add_task(noop)
        pending = traced() - before
        await tasks.run()
        del tasks  # the request is over: only the tracker holds the handles
        finished = traced() - before
    return pending / batch, finished / batch


async def warm_up(state: Mapping[str, Any]) -> None:
    """Run a few tasks, so that caches and lazily built objects are not counted."""
    for _ in range(100):
        tasks = bound(state)
        tasks.add_task(noop)
        await tasks.run()


def history_length(tracker: TaskTracker) -> int:
    """Finished handles the tracker keeps, as its repr says (no API counts them)."""
    match = re.search(r"history=(\d+)", repr(tracker))
    assert match is not None
    return int(match[1])


async def ceiling(total: int, samples: int) -> list[tuple[int, int, int]]:
    """(tasks so far, tracked bytes, handles in history) every total/samples tasks."""
    tracker = TaskTracker()
    points = []
    async with tracker.lifespan(None) as state:
        await warm_up(state)
        base = traced()
        step = total // samples
        for done in range(step, total + 1, step):
            for _ in range(step):
                tasks = bound(state)
                tasks.add_task(noop)
                await tasks.run()
            del tasks
            points.append((done, traced() - base, history_length(tracker)))
    return points


async def main(batch: int, total: int) -> None:
    tracemalloc.start()
    pending, finished = await per_task(batch)
    points = await ceiling(total, 10)
    tracemalloc.stop()

    print(
        table(
            ["what", "bytes per task"],
            [
                [f"pending, tracked ({batch:,} queued)", f"{pending:,.0f}"],
                [f"finished, kept in the history ({batch:,})", f"{finished:,.0f}"],
            ],
        )
    )
    print()
    rows = [[f"{done:,}", f"{size / 1e6:.2f}", f"{kept:,}"] for done, size, kept in points]
    print(table(["tasks run", "tracked MB above start", "handles in history"], rows))
    print()
    full = [size for done, size, _ in points if done > DEFAULT_HISTORY_SIZE]
    print(
        f"history_size={DEFAULT_HISTORY_SIZE:,} (default): ceiling {max(full) / 1e6:.2f} MB;"
        f" from {min(full) / 1e6:.2f} to {max(full) / 1e6:.2f} MB once the history is full"
        f" ({(max(full) - min(full)) / 1e3:+.0f} kB over {total - DEFAULT_HISTORY_SIZE:,} tasks)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=10_000, help="tasks for per-task bytes")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks through the tracker")
    options = parser.parse_args()
    print_header("Memory held by the TaskTracker (tracemalloc)")
    anyio.run(main, options.batch, options.tasks)
