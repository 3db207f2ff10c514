"""What a `TaskTracker` holds in memory, measured with tracemalloc.

Run as ``python -m tests.apps.memory asyncio`` (or ``trio``); prints JSON.
`tests/test_tracker.py` runs it in a process of its own, where no coverage
tracer slows the 100,000 tasks down and no other test's objects count.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

from fastapi_bgplus import TaskHandle, TaskTracker, TrackedBackgroundTasks


@asynccontextmanager
async def request_tasks(state: Mapping[str, Any]) -> AsyncIterator[TrackedBackgroundTasks]:
    """A collection bound, as FastAPI's provider binds a request's, to the
    tracker in the lifespan `state`; leaving the block runs it, as the end of
    the request does. (Requests through FastAPI itself: tests/test_tracker.py.)"""
    tasks = TrackedBackgroundTasks.for_request({"type": "http", "state": dict(state)})
    yield tasks
    await tasks.run()


async def noop() -> None:
    pass


class Stubborn:
    """A task that swallows its cancellation: cut off, it goes on until
    `release` is set. `running` is set once it has started."""

    def __init__(self) -> None:
        self.running = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self) -> None:
        self.running.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.release.wait()


async def run_tasks(state: Mapping[str, Any], count: int) -> list[TaskHandle]:
    """One request that queues `count` no-op tasks; they have run on return."""
    async with request_tasks(state) as tasks:
        return [tasks.add_task(noop) for _ in range(count)]


async def retained_bytes(body: Callable[[], Awaitable[object]]) -> int:
    """Bytes allocated by `body` and still held once it is over."""
    gc.collect()
    tracemalloc.start()
    try:
        await body()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


async def growth(warm_up: int = 10_000, measured: int = 90_000) -> int:
    """Bytes retained by `measured` finished tasks after `warm_up` others,
    with a history of 100: flat memory means next to nothing."""
    tracker = TaskTracker(history_size=100)
    async with tracker.lifespan(None) as state:

        async def requests(count: int) -> None:
            for _ in range(count // 100):
                await run_tasks(state, 100)

        await requests(warm_up)  # the history is full, caches are warm
        return await retained_bytes(lambda: requests(measured))


async def per_task(count: int = 10_000) -> tuple[float, float]:
    """Bytes per task while queued (with the collection's own share) and once
    finished (its handle in the tracker's history)."""
    tracker = TaskTracker(history_size=count)
    queued: list[int] = []
    async with tracker.lifespan(None) as state:

        async def queue_then_run() -> None:
            async with request_tasks(state) as tasks:
                for _ in range(count):
                    tasks.add_task(noop)
                queued.append(tracemalloc.get_traced_memory()[0])

        finished = await retained_bytes(queue_then_run)
        assert f"history={count}>" in repr(tracker)
    return queued[0] / count, finished / count


async def main() -> None:
    pending, finished = await per_task()
    figures = {
        "growth_bytes_after_100k_tasks": await growth(),
        "bytes_per_pending_task": round(pending, 1),
        "bytes_per_finished_task_in_history": round(finished, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
