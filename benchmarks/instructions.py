"""Machine instructions per request and per task, counted by valgrind (issue 9).

Times on a shared machine move by several per cent from one run to the next,
which is the size of the differences the per-request and per-task targets are
about. An instruction count does not move: valgrind's callgrind counts every
instruction the interpreter executes, whatever the neighbours do. It is not a
time (a cache miss costs nothing here, and an instruction of one kind is not
worth one of another), so the targets stay in `per_request.py` and
`per_task.py`; this shows where the instructions go, exactly, and what a
change saves.

Two tables, each row counted in a process of its own under callgrind, run
twice (a short and a long run, so that startup and warm-up cancel out):

1. per request, over raw ASGI, in process: one app and one route per mechanism,
   as `per_request.py --in-process` serves them (`apps.MECHANISMS`), the
   `TaskTracker` lifespan on;
2. per task: build a collection, add one no-op async task, run it, as
   `per_task.py` times it: Starlette's collection, FastAPI's, ours bound to no
   tracker, ours bound to a tracker as the FastAPI provider binds it, and the
   least tracked collection (`_least.py`), a floor.

Needs valgrind (Debian/Ubuntu: ``apt-get install -y valgrind``). Run from the
project root::

    .venv/bin/python benchmarks/instructions.py            # ~20 min (requests ~16, tasks ~3)
    .venv/bin/python benchmarks/instructions.py --only task
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import anyio
from _common import BENCHMARKS, print_header, table

# Per task: what each row builds, adds to and runs (see `count_tasks`).
COLLECTIONS = (
    "starlette",
    "fastapi",
    "bgplus, no tracker",
    "bgplus, TaskTracker bound",
    "the least tracked collection (a floor)",
)

# Per request: the budget (SPEC, "Performance, 0.3") compares a tracked
# request with the floor, FastAPI's own collection plus one plain `async def`
# dependency (the least any `Depends`-based drop-in can cost).
FLOOR = "fastapi + any plain dependency"
TRACKED = "fastapi_bgplus.BackgroundTasks"
METRICS = "fastapi_bgplus.BackgroundTasks, PrometheusMetrics observing"
REQUESTS = (
    "fastapi",
    FLOOR,
    TRACKED,
    METRICS,
    "fastapi_bgplus.BackgroundTasks, tracker off",
)

SHORT, LONG = 300, 1_300  # requests (x10 for tasks) of the two runs per row
# Before them, the warm-up: for tasks, enough to fill the tracker's default
# history, so that every counted task also evicts one (as in a server that
# has run a while); a request costs too much under valgrind for that.
REQUEST_WARMUP, TASK_WARMUP = 300, 10_000


async def noop() -> None:
    return None


async def count_requests(mechanism: str, n: int) -> None:
    """Serve `n` requests to `mechanism`'s app, after as many to warm up."""
    import apps
    from per_request import ORDER, asgi_post

    from fastapi_bgplus import TaskTracker

    body = json.dumps(ORDER).encode()
    observers: list[Any] = []
    if mechanism == METRICS:
        from prometheus_client import CollectorRegistry

        from fastapi_bgplus.prometheus import PrometheusMetrics

        observers.append(PrometheusMetrics(registry=CollectorRegistry()))
        mechanism = TRACKED
    app = apps.mechanism_app(mechanism)
    async with TaskTracker(observers=observers).lifespan(app) as state:
        for _ in range(REQUEST_WARMUP + n):
            await asgi_post(app, state, body)


async def count_tasks(collection: str, n: int) -> None:
    """Build, fill with one no-op task and run `n` collections of one kind."""
    import asyncio

    import fastapi
    from _least import LeastTracked, on_asyncio
    from starlette.background import BackgroundTasks

    from fastapi_bgplus import TaskTracker, TrackedBackgroundTasks

    on_asyncio(asyncio.get_running_loop())
    async with TaskTracker().lifespan(None) as state:
        scope = {"type": "http", "state": dict(state)}
        make: Any = {
            "starlette": BackgroundTasks,
            "fastapi": fastapi.BackgroundTasks,
            "bgplus, no tracker": TrackedBackgroundTasks,
            "bgplus, TaskTracker bound": lambda: TrackedBackgroundTasks.for_request(scope),
            "the least tracked collection (a floor)": LeastTracked,
        }[collection]
        for _ in range(TASK_WARMUP + n):
            tasks = make()
            tasks.add_task(noop)
            await tasks()


def instructions(kind: str, name: str, n: int) -> int:
    """What callgrind counts for one child process serving `n` units."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        kind,
        name,
        str(n),
    ]
    # One hash seed for every run: string hashes decide where dict entries go.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"callgrind failed for {kind} {name!r}:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_unit(kind: str, name: str, scale: int) -> float:
    """Instructions per request (or task): the long run minus the short one."""
    short = instructions(kind, name, SHORT * scale)
    long = instructions(kind, name, LONG * scale)
    return (long - short) / ((LONG - SHORT) * scale)


def report(kind: str, names: list[str], base: str, scale: int, unit: str) -> None:
    counts: dict[str, float] = {}
    for name in names:
        counts[name] = per_unit(kind, name, scale)
        print(f"  done: {name}", flush=True)
    rows = [
        [
            name,
            f"{counts[name]:,.0f}",
            f"{counts[name] - counts[base]:+,.0f}",
            f"{counts[name] / counts[base]:.3f}x",
        ]
        for name in names
    ]
    print()
    print(table([kind, f"instructions/{unit}", f"vs {base}", "ratio"], rows))
    print()


def main(only: str) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind: apt-get install -y valgrind")
    if only in ("", "request"):
        report("request", list(REQUESTS), FLOOR, 1, "request")
    if only == "all-requests":
        import apps

        report("request", list(apps.MECHANISMS), FLOOR, 1, "request")
    if only in ("", "task"):
        report("task", list(COLLECTIONS), "starlette", 10, "task")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["request", "task", "all-requests"], default="")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "NAME", "N"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        kind, name, n = options.child
        sys.path.insert(0, str(BENCHMARKS))
        count = count_requests if kind == "request" else count_tasks
        anyio.run(count, name, int(n))
    else:
        print_header("Instructions per request and per task (valgrind callgrind)")
        main(options.only)
