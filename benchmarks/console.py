"""A page of the console's list with 1,000,000 records held (issue 25).

Fills a `SQLiteStore` and a `RedisStore` with ``--records`` records (default
1,000,000: ten task names, every status, one created every millisecond),
then times `store.query()` (what `tracker.list()` asks for one page of 50)
for: the newest page; a page halfway down, reached by its cursor; one status
(``failed``, a tenth of the records); several statuses; a name and a status;
a name alone (read status by status). Each call is timed ``--repeat`` times,
interleaved; the table gives the median and the 90th percentile. A page costs
O(page), not O(records): the target is a page in at most 20 ms.

Filling takes a few minutes (the Redis store writes its indexes as it would
in production, one pipeline per batch). A throwaway `redis-server` is started
on a free port; ``--only sqlite`` skips it. Run from the project root::

    .venv/bin/python benchmarks/console.py                     # ~4 min
    .venv/bin/python benchmarks/console.py --records 100000    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _common import ROOT, free_port, print_header, table

sys.path.insert(0, str(ROOT))
from fastapi_bgplus import ConsoleStore, SQLiteStore
from tests.redis_server import RedisServer

NAMES = [f"app.tasks.job_{n}" for n in range(10)]
STATUSES = ["done"] * 6 + ["failed", "cancelled", "running", "pending"]
START = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
BATCH = 5_000
PAGE = 50


def record(n: int) -> dict[str, Any]:
    created = datetime.fromtimestamp(START + n / 1000, timezone.utc).isoformat()
    return {
        "task_id": uuid.uuid4().hex,
        "name": NAMES[n % len(NAMES)],
        "status": STATUSES[(n // len(NAMES)) % len(STATUSES)],
        "created_at": created,
        "started_at": created,
        "finished_at": created,
        "duration_s": 0.25,
        "error": None,
        "attempts": 1,
        "owner": "1-0000000000000000",
    }


async def fill(store: ConsoleStore, count: int) -> float:
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        batch = [record(n) for n in range(first, min(first + BATCH, count))]
        await store.put(batch, history_ttl=None)
    return time.perf_counter() - started


async def measure(store: ConsoleStore, count: int, repeat: int) -> dict[str, list[float]]:
    middle = await store.query(
        before=(START + count / 2000, "f" * 32), limit=1
    )  # the key of a record halfway down: what a cursor holds
    halfway = (
        datetime.fromisoformat(middle[0]["created_at"]).timestamp(),
        middle[0]["task_id"],
    )
    calls: dict[str, Callable[[], Awaitable[list[dict[str, Any]]]]] = {
        "newest page": lambda: store.query(limit=PAGE),
        "page halfway down (cursor)": lambda: store.query(limit=PAGE, before=halfway),
        "status=failed": lambda: store.query(statuses={"failed"}, limit=PAGE),
        "status=failed,cancelled,lost": lambda: store.query(
            statuses={"failed", "cancelled", "pending", "running"}, limit=PAGE
        ),
        "name + status=failed": lambda: store.query(name=NAMES[3], statuses={"failed"}, limit=PAGE),
        "name alone": lambda: store.query(name=NAMES[3], limit=PAGE),
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm up
        assert len(await call()) == PAGE
    for _ in range(repeat):
        for name, call in calls.items():
            started = time.perf_counter()
            await call()
            timings[name].append(time.perf_counter() - started)
    return timings


def rows(kind: str, timings: dict[str, list[float]]) -> list[list[str]]:
    result = []
    for name, values in timings.items():
        ordered = sorted(values)
        result.append(
            [
                kind,
                name,
                f"{statistics.median(ordered) * 1e3:.2f}",
                f"{ordered[int(len(ordered) * 0.9)] * 1e3:.2f}",
            ]
        )
    return result


async def run_store(store: ConsoleStore, kind: str, count: int, repeat: int) -> list[list[str]]:
    seconds = await fill(store, count)
    print(f"{kind}: {count:,} records written in {seconds:.0f} s", flush=True)
    timings = await measure(store, count, repeat)
    await store.aclose()
    return rows(kind, timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--only", choices=["sqlite", "redis"])
    args = parser.parse_args()
    print_header(f"Console: a page of {PAGE} with {args.records:,} records held")
    table_rows: list[list[str]] = []
    directory = Path(tempfile.mkdtemp())
    if args.only in (None, "sqlite"):
        store = SQLiteStore(directory / "tasks.db")
        table_rows += asyncio.run(run_store(store, "SQLite", args.records, args.repeat))
    if args.only in (None, "redis"):
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed: apt-get install redis-server")
        server = RedisServer(binary, directory, free_port())
        server.start()
        try:
            from fastapi_bgplus import RedisStore

            redis_store = RedisStore(server.url, prefix=f"bench-{uuid.uuid4().hex}:")
            table_rows += asyncio.run(run_store(redis_store, "Redis", args.records, args.repeat))
        finally:
            server.stop()
    print(table(["store", "page", "median ms", "p90 ms"], table_rows))


if __name__ == "__main__":
    main()
