"""`RedisStore` round trips against a local `redis-server` (issue 10).

Times, on asyncio, with one store (one pooled connection, warm):

1. one ``put`` of a batch of ``--batch`` records (default 100: what the
   write-behind writer sends per flush under load), finished records with a
   ``history_ttl``, one pipeline;
2. one ``put`` of a single record, for comparison (a round trip per task);
3. one ``get`` of a task id that exists.

Wall time is the caller's wait; client CPU is what this process spent on the
call (encoding, redis-py, parsing the replies), which is what the app pays
even though the writer runs off the request path.

The variants are interleaved, ``--rounds`` rounds of ``--repeat`` calls each;
the table gives medians over every call. By default a throwaway `redis-server`
(Debian's package, ``apt-get install redis-server``) is started on a free port,
as the tests start it; ``--url`` measures an existing server instead.

Run from the project root::

    .venv/bin/python benchmarks/store_redis.py      # ~5 s
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
from pathlib import Path
from typing import Any

from _common import ROOT, free_port, print_header, rotated, table

sys.path.insert(0, str(ROOT))
from fastapi_bgplus import RedisStore
from tests.redis_server import RedisServer


def record(status: str) -> dict[str, Any]:
    return {
        "task_id": uuid.uuid4().hex,
        "name": "app.send_email",
        "status": status,
        "created_at": "2026-11-25T09:00:00.123456+00:00",
        "started_at": "2026-11-25T09:00:00.223456+00:00",
        "finished_at": "2026-11-25T09:00:01.323456+00:00",
        "duration_s": 1.1,
        "error": None,
        "attempts": 1,
        "owner": uuid.uuid4().hex,
    }


Timings = dict[str, list[tuple[float, float]]]


async def measure(url: str, rounds: int, repeat: int, batch: int) -> Timings:
    store = RedisStore(url, prefix=f"bench-{uuid.uuid4().hex}:")
    known = record("done")
    await store.put([known], history_ttl=600.0)

    # Each call is built (its records drawn) before the clock starts: the
    # writer has its records already.
    def put_batch() -> Awaitable[None]:
        return store.put([record("done") for _ in range(batch)], history_ttl=600.0)

    def put_one() -> Awaitable[None]:
        return store.put([record("done")], history_ttl=600.0)

    async def get() -> None:
        assert await store.get(known["task_id"]) == known

    variants: dict[str, Callable[[], Awaitable[None]]] = {
        f"put, batch of {batch}": put_batch,
        "put, 1 record": put_one,
        "get": get,
    }
    timings: Timings = {name: [] for name in variants}
    for name in variants:  # warm up: connection, code paths
        for _ in range(20):
            await variants[name]()
    for round_no in range(rounds):
        for name in rotated(list(variants), round_no):
            call = variants[name]
            for _ in range(repeat):
                pending = call()
                started, cpu = time.perf_counter(), time.process_time()
                await pending
                timings[name].append((time.perf_counter() - started, time.process_time() - cpu))
    await store.aclose()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--url", help="an existing Redis server (default: start one)")
    args = parser.parse_args()
    print_header("RedisStore round trips")
    server = None
    url = args.url
    if url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed: apt-get install redis-server")
        server = RedisServer(binary, Path(tempfile.mkdtemp()), free_port())
        server.start()
        url = server.url
    try:
        timings = asyncio.run(measure(url, args.rounds, args.repeat, args.batch))
    finally:
        if server is not None:
            server.stop()
    rows = []
    for name, values in timings.items():
        wall = sorted(elapsed for elapsed, _ in values)
        cpu = [used for _, used in values]
        rows.append(
            [
                name,
                f"{statistics.median(wall) * 1e6:,.0f}",
                f"{wall[int(len(wall) * 0.9)] * 1e6:,.0f}",
                f"{statistics.median(cpu) * 1e6:,.0f}",
                str(len(values)),
            ]
        )
    print(f"server: {url}")
    print(table(["call", "median us", "p90 us", "client CPU us (median)", "calls"], rows))


if __name__ == "__main__":
    main()
