"""Per-request cost of a task store (issue 10), in-process over raw ASGI.

The same realistic endpoint as `per_request.py` (a small JSON order validated
by Pydantic, a JSON receipt, one no-op async task through
`fastapi_bgplus.BackgroundTasks`), in one app per variant, each with its own
`TaskTracker` lifespan running: no store, `MemoryStore`, `SQLiteStore` (a file
in a temporary directory). The store's writes run as they do in production,
every 0.2 s from the lifespan, in the same process. Each sample times a burst
of requests on the wall clock (what a client waits: the request path), then
waits until the store holds every record of the burst and reports the CPU
time of the whole process over both (`time.process_time`, all threads: the
full cost of the store, the SQLite thread included). Rounds are interleaved;
the figures are medians, in microseconds per request. It also counts the
store writes, to show they are batched.

Run from the project root::

    .venv/bin/python benchmarks/store.py               # ~1 min
    .venv/bin/python benchmarks/store.py --rounds 5 --requests 5000
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from _common import median, print_header, rotated, table
from _models import Order
from fastapi import FastAPI
from per_request import ORDER, asgi_post

import fastapi_bgplus
from fastapi_bgplus import MemoryStore, SQLiteStore, TaskStore, TaskTracker

VARIANTS = ("no store", "MemoryStore", "SQLiteStore")


async def noop(order_id: int) -> None:
    return None


class Counting:
    """Counts the writes of the store it wraps."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.puts = 0
        self.records = 0
        self.progress = anyio.Event()

    def __repr__(self) -> str:
        return repr(self.store)

    async def put(self, records: Sequence[dict[str, Any]], *, history_ttl: float | None) -> None:
        await self.store.put(records, history_ttl=history_ttl)
        self.puts += 1
        self.records += len(records)
        self.progress.set()

    async def written(self, count: int) -> None:
        """Return once `count` records have been written since the start."""
        while self.records < count:
            self.progress = anyio.Event()
            await self.progress.wait()  # idle: costs no CPU time

    async def get(self, task_id: str) -> dict[str, Any] | None:
        return await self.store.get(task_id)

    async def renew_lease(self, owner: str, ttl: float) -> None:
        await self.store.renew_lease(owner, ttl)

    async def lease_alive(self, owner: str) -> bool:
        return await self.store.lease_alive(owner)

    async def aclose(self) -> None:
        await self.store.aclose()


def make_app() -> FastAPI:
    app = FastAPI()
    ids = iter(range(1, 10**9))

    @app.post("/x")
    async def order(order: Order, tasks: fastapi_bgplus.BackgroundTasks) -> dict[str, Any]:
        order_id = next(ids)
        tasks.add_task(noop, order_id)
        total = sum(item.quantity * item.unit_price for item in order.items)
        return {"order_id": order_id, "total": round(total, 2)}

    return app


async def main(rounds: int, requests: int) -> None:
    body = json.dumps(ORDER).encode()
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, Counting | None] = {
            "no store": None,
            "MemoryStore": Counting(MemoryStore()),
            "SQLiteStore": Counting(SQLiteStore(Path(tmp) / "tasks.db")),
        }
        served: dict[str, tuple[FastAPI, dict[str, Any]]] = {}
        async with AsyncExitStack() as stack:
            for variant, store in stores.items():
                app = make_app()
                tracker = TaskTracker(store=store)
                state = await stack.enter_async_context(tracker.lifespan(app))
                served[variant] = (app, state)
                for _ in range(200):  # warm up, and check the endpoint answers
                    assert await asgi_post(app, state, body) == 200, variant
            counted = {v: (s.puts, s.records) for v, s in stores.items() if s is not None}
            wall: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            sent = dict.fromkeys(VARIANTS, 0)
            for round_no in range(rounds):
                for variant in rotated(VARIANTS, round_no):
                    app, state = served[variant]
                    store = stores[variant]
                    target = (store.records if store else 0) + requests
                    gc.collect()
                    started_cpu = time.process_time()
                    started = time.perf_counter()
                    for _ in range(requests):
                        await asgi_post(app, state, body)
                    wall[variant].append((time.perf_counter() - started) / requests * 1e6)
                    if store is not None:
                        await store.written(target)
                    cpu[variant].append((time.process_time() - started_cpu) / requests * 1e6)
                    sent[variant] += requests
        # Leaving the stack wrote the last records.
    rows = []
    for variant in VARIANTS:
        store = stores[variant]
        if store is None:
            writes = "-"
        else:
            puts = store.puts - counted[variant][0]
            writes = f"{puts:,} writes for {sent[variant]:,} requests"
        rows.append(
            [
                variant,
                f"{median(wall[variant]):.1f}",
                f"{median(wall[variant]) - median(wall['no store']):+.1f}",
                f"{median(cpu[variant]):.1f}",
                f"{median(cpu[variant]) - median(cpu['no store']):+.1f}",
                writes,
            ]
        )
    headers = ["tracker store", "wall us/req", "vs none", "CPU us/req", "vs none", "writes"]
    print(table(headers, rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds (9)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per sample (2000)")
    options = parser.parse_args()
    print_header(f"Per-request cost of a task store, in-process ({options.rounds} rounds)")
    anyio.run(main, options.rounds, options.requests)
