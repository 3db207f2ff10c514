"""Flow control under a burst: 1,000 concurrent requests against a detached tracker.

Each request queues one task that holds a connection for a while (an
``anyio.sleep``). Side by side, in one process over raw ASGI:

- no limit (``detach=True``);
- ``max_concurrent=10``;
- ``max_concurrent=10, max_queued=100`` (the rest answered 503 through a
  ``QueueFull`` handler).

For each: the peak of tasks running at once (counted inside the tasks), the
memory allocated at the peak (tracemalloc), the p99 latency of an unrelated
endpoint served during the burst against the same endpoint with no load, the
count of 503 answers, and how many tasks ran. Run from the project root::

    .venv/bin/python benchmarks/flow.py            # --requests 1000 --hold 0.2 --probes 200
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from typing import Any

import anyio
from _common import asgi_request, print_header, table
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fastapi_bgplus import BackgroundTasks, QueueFull, TaskTracker


def build(tracker: TaskTracker, hold: float, counts: dict[str, int]) -> FastAPI:
    app = FastAPI(lifespan=tracker.lifespan)

    async def held_connection() -> None:
        counts["running"] += 1
        counts["peak"] = max(counts["peak"], counts["running"])
        counts["peak_memory"] = max(counts["peak_memory"], tracemalloc.get_traced_memory()[0])
        await anyio.sleep(hold)
        counts["running"] -= 1
        counts["ran"] += 1

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, {"Retry-After": "1"})

    @app.post("/signup")
    async def signup(tasks: BackgroundTasks) -> dict[str, str]:
        return {"id": tasks.add_task(held_connection).task_id}

    @app.get("/health")
    async def health() -> str:
        return "ok"

    return app


async def p99_of_probes(app: Any, state: dict[str, Any], probes: int) -> float:
    latencies = []
    for _ in range(probes):
        started = time.perf_counter()
        await asgi_request(app, state, "GET", "/health")
        latencies.append(time.perf_counter() - started)
        await anyio.sleep(0.001)
    return statistics.quantiles(latencies, n=100)[98] * 1000


async def scenario(
    name: str, tracker: TaskTracker, requests: int, hold: float, probes: int
) -> list[str]:
    counts = {"running": 0, "peak": 0, "ran": 0, "peak_memory": 0}
    app = build(tracker, hold, counts)
    tracemalloc.start()
    async with tracker.lifespan(app) as state:
        idle = await p99_of_probes(app, state, probes)
        statuses: list[int] = []

        async def one() -> None:
            statuses.append(await asgi_request(app, state, "POST", "/signup"))

        async with anyio.create_task_group() as group:
            for _ in range(requests):
                group.start_soon(one)
            loaded = await p99_of_probes(app, state, probes)
    # Leaving the lifespan drained the tasks: every accepted one has run.
    tracemalloc.stop()
    return [
        name,
        str(counts["peak"]),
        f"{counts['peak_memory'] / 1e6:.1f}",
        f"{idle:.2f}",
        f"{loaded:.2f}",
        str(statuses.count(503)),
        str(counts["ran"]),
    ]


async def main(requests: int, hold: float, probes: int) -> None:
    rows = [
        await scenario("no limit", TaskTracker(detach=True), requests, hold, probes),
        await scenario(
            "max_concurrent=10",
            TaskTracker(detach=True, max_concurrent=10),
            requests,
            hold / 10,
            probes,
        ),
        await scenario(
            "max_concurrent=10, max_queued=100",
            TaskTracker(detach=True, max_concurrent=10, max_queued=100),
            requests,
            hold / 10,
            probes,
        ),
    ]
    headers = [
        "tracker",
        "peak running",
        "MB at peak",
        "/health p99 idle (ms)",
        "/health p99 in burst (ms)",
        "503 answers",
        "tasks ran",
    ]
    print(table(headers, rows))
    print(f"\n{requests} requests at once; a task holds {hold} s, or {hold / 10} s with a limit")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=0.2)
    parser.add_argument("--probes", type=int, default=200)
    options = parser.parse_args()
    print_header("Flow control under a burst of concurrent requests")
    anyio.run(main, options.requests, options.hold, options.probes)
