"""Starvation: a `def` endpoint's latency while blocking sync tasks run (issue 4).

Serves `benchmarks/apps.py` with one uvicorn worker on 127.0.0.1 and talks to
it over real HTTP. Each round has three phases, in a rotating order:

- ``idle``: nothing queued;
- ``fastapi``: 60 requests each queue one ``time.sleep(1)`` sync task through
  `fastapi.BackgroundTasks`, which runs it on anyio's default thread limiter
  (40 tokens), the one every ``def`` endpoint needs too;
- ``bgplus``: the same through `fastapi_bgplus.BackgroundTasks`, which runs it
  under `fastapi_bgplus.current_thread_limiter()`.

Right after the 60 requests have been answered, ``GET /ping`` (a plain ``def``
endpoint) is called over and over for one second; the phase ends once every
blocking task has finished. Reported: the first ping's latency (the one that
meets a saturated pool), the median and the slowest, as medians over rounds.

Run from the project root::

    .venv/bin/python benchmarks/starvation.py               # 5 rounds: ~40 s
    .venv/bin/python benchmarks/starvation.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import time

import anyio
import httpx2
from _common import (
    free_port,
    http_implementation,
    median,
    print_header,
    rotated,
    start_uvicorn,
    stop,
    table,
)

PHASES = ("idle", "fastapi", "bgplus")


async def ping(client: httpx2.AsyncClient) -> float:
    started = time.perf_counter()
    response = await client.get("/ping")
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def queue_blocking(
    client: httpx2.AsyncClient, variant: str, count: int, seconds: float
) -> None:
    async def one() -> None:
        response = await client.post(f"/block/{variant}", params={"seconds": seconds})
        response.raise_for_status()

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)


async def wait_until_idle(client: httpx2.AsyncClient) -> None:
    # Polling: the tasks run in another process, so there is no event to wait on.
    with anyio.fail_after(60):
        while True:
            if not (await client.get("/stats")).json()["unfinished"]:
                return
            await anyio.sleep(0.05)


async def phase(
    base: str, variant: str, *, tasks: int, seconds: float, window: float
) -> list[float]:
    """Ping latencies (ms) over `window` seconds, in order."""
    limits = httpx2.Limits(max_connections=tasks + 10)
    async with (
        httpx2.AsyncClient(base_url=base, limits=limits, timeout=60) as loader,
        httpx2.AsyncClient(base_url=base, timeout=60) as pinger,
    ):
        await ping(pinger)  # the pinger's connection is open before timing
        if variant != "idle":
            await queue_blocking(loader, variant, tasks, seconds)
        started = time.perf_counter()
        latencies = [await ping(pinger)]
        while time.perf_counter() - started < window:
            latencies.append(await ping(pinger))
        await wait_until_idle(loader)
    return latencies


async def main(rounds: int, tasks: int, seconds: float) -> None:
    cores = sorted(os.sched_getaffinity(0))
    http = http_implementation()
    print(
        f"uvicorn: 1 worker, --http {http}, on core {cores[0]}; {tasks} blocking tasks of"
        f" {seconds:g} s per phase; {rounds} rounds x {len(PHASES)} phases",
        flush=True,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_uvicorn("apps:app", port, cpus=str(cores[0]), http=http)
    results: dict[str, list[list[float]]] = {name: [] for name in PHASES}
    try:
        for round_no in range(rounds):
            for name in rotated(PHASES, round_no):
                latencies = await phase(base, name, tasks=tasks, seconds=seconds, window=seconds)
                results[name].append(latencies)
                print(
                    f"  round {round_no + 1} {name:8s} first {latencies[0]:8.1f} ms"
                    f"  median {median(latencies):7.1f} ms  max {max(latencies):8.1f} ms"
                    f"  ({len(latencies)} pings)",
                    flush=True,
                )
    finally:
        stop(server)

    summary = {
        name: (
            median([r[0] for r in runs]),
            median([median(r) for r in runs]),
            median([max(r) for r in runs]),
        )
        for name, runs in results.items()
    }
    rows = [
        [name, f"{first:.1f}", f"{mid:.1f}", f"{slowest:.1f}"]
        for name, (first, mid, slowest) in summary.items()
    ]
    print()
    print(table(["phase", "first ping ms", "median ping ms", "slowest ping ms"], rows))
    print()
    idle = summary["idle"][2]
    for name in ("fastapi", "bgplus"):
        print(f"{name}: slowest ping {summary[name][2] - idle:+.1f} ms vs idle")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--tasks", type=int, default=60, help="blocking tasks per phase (60)")
    parser.add_argument("--seconds", type=float, default=1.0, help="each task's sleep (1.0)")
    options = parser.parse_args()
    print_header("Starvation of def endpoints by blocking sync tasks (interleaved)")
    anyio.run(main, options.rounds, options.tasks, options.seconds)
