"""Per-task cost: build a collection, add no-op tasks, run it (issue 4).

Compares, inside one event loop and in the same run, Starlette's bare
`starlette.background.BackgroundTasks`, `fastapi.BackgroundTasks` and
`fastapi_bgplus.TrackedBackgroundTasks`. Each round times every variant once,
in a rotating order; the figure is the median over the rounds of the time per
task (ns), and the ratio is bgplus / Starlette, of those medians and (the last
column) the median of each round's own ratio, which a shared machine's load
moves less. Targets (contract,
"Performance, 0.2"): <= 1.5x with no receiver connected, <= 2x with a
`TaskTracker` bound.

Scenarios: async no-op tasks, 1 and 10 per collection (no receivers); the same
with one sync and one async receiver connected to every signal; sync no-op tasks
(one thread hop each); async tasks with a `TaskTracker` bound, as the FastAPI
provider binds it, and three floors of that row: Starlette's collection plus
the least a drain needs to cut a run off (the host task recorded on asyncio, a
cancel scope on trio), that plus the least a tracker keeps per task (an id, an
index by id while it runs, a bounded history: `Booked`), and the least tracked
collection (`_least.LeastTracked`: those books and a record with status and
timings, without Starlette's per-task check); async tasks
with options (`@task(timeout=...)`, and `@task(attempts=3, retry_on=...)` that
never needs a retry), where Starlette and FastAPI run the plain function;
async tasks in a collection built as the FastAPI provider builds it
(`for_request`), with no span recording and then inside a recording request
span (OpenTelemetry SDK, no exporter): there "fastapi" is Starlette's
collection with each task in a span as FastAPI 0.165 opens it (FastAPI itself
traces only inside its own request telemetry).

Run from the project root::

    .venv/bin/python benchmarks/per_task.py               # about 1 minute
    .venv/bin/python benchmarks/per_task.py --rounds 10   # quicker
    .venv/bin/python benchmarks/per_task.py --backend trio
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import fastapi
from _common import median, print_header, rotated, table
from _least import LeastTracked, on_asyncio
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

from fastapi_bgplus import (
    DEFAULT_HISTORY_SIZE,
    TaskTracker,
    TrackedBackgroundTasks,
    signals,
    task,
)

Factory = Callable[[], StarletteBackgroundTasks]


async def noop() -> None:
    return None


def noop_sync() -> None:
    return None


noop_timeout = task(timeout=60.0)(noop)
noop_retried = task(attempts=3, retry_on=ConnectionError)(noop)


def on_signal(sender: Any, **kwargs: Any) -> None:
    return None


async def on_signal_async(sender: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def receivers_connected() -> Iterator[None]:
    """One sync and one async receiver on every signal, for every sender."""
    all_signals = (
        signals.task_started,
        signals.task_completed,
        signals.task_failed,
        signals.task_abandoned,
    )
    for signal in all_signals:
        signal.connect(on_signal, weak=False)
        signal.connect(on_signal_async, weak=False)
    try:
        yield
    finally:
        for signal in all_signals:
            signal.disconnect(on_signal)
            signal.disconnect(on_signal_async)


@contextmanager
def tracer_recording() -> Iterator[None]:
    """A recording request span around the scenario, from an SDK provider."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    with trace.get_tracer("benchmark").start_as_current_span("request"):
        yield


class FastAPITraced(StarletteBackgroundTasks):
    """Starlette's collection, each task in a span as FastAPI 0.165 opens it
    (`fastapi.telemetry._api._traced_operation`)."""

    async def __call__(self) -> None:
        from opentelemetry import trace

        tracer = trace.get_tracer("fastapi")
        for queued in self.tasks:
            name = f"{queued.func.__module__}.{queued.func.__qualname__}"
            with tracer.start_as_current_span(
                "fastapi.background_task",
                attributes={"code.function.name": name},
                record_exception=False,
                set_status_on_exception=False,
            ):
                await queued()


class DrainHook(StarletteBackgroundTasks):
    """Starlette's collection plus the least a drain needs to cut its run off
    from outside. On asyncio: the host task, recorded as the run starts (on
    the loop the tracker started on, as ours). On trio, which cancels nothing
    else: a cancel scope around the run."""

    loop: asyncio.AbstractEventLoop | None = None  # set by main() on asyncio

    # Starlette's loop is written out in each branch here and in `Booked`, not
    # shared through a helper: a floor must not pay for a call ours does not make.
    async def __call__(self) -> None:
        if self.loop is not None:
            self.host = asyncio.current_task(self.loop)
            for task in self.tasks:
                await task()
            return
        import trio

        with trio.CancelScope() as self.scope:
            for task in self.tasks:
                await task()


class Booked(DrainHook):
    """`DrainHook` plus the least a tracker keeps so that a task's status can
    be asked by id, while it runs and after: an id from the OS's random
    source (drawn 64 at a time, as ours), the task indexed by it until it
    ends, then a place in a bounded history. No status, clock, log line or
    signal: what a `TaskHandle` and the reporter add is ours to pay."""

    # The tracker's, shared by every collection.
    ids: ClassVar[list[str]] = []
    live: ClassVar[dict[str, BackgroundTask]] = {}
    history: ClassVar[deque[BackgroundTask]] = deque(maxlen=DEFAULT_HISTORY_SIZE)

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().add_task(func, *args, **kwargs)
        if not self.ids:
            self.ids.extend(os.urandom(16 * 64).hex(" ", 16).split())
        task = self.tasks[-1]
        task.task_id = task_id = self.ids.pop()  # type: ignore[attr-defined]
        self.live[task_id] = task

    async def __call__(self) -> None:
        live = self.live
        if self.loop is not None:
            self.host = asyncio.current_task(self.loop)
            for task in self.tasks:
                await task()
                del live[task.task_id]  # type: ignore[attr-defined]
                self.history.append(task)
            return
        import trio

        with trio.CancelScope() as self.scope:
            for task in self.tasks:
                await task()
                del live[task.task_id]  # type: ignore[attr-defined]
                self.history.append(task)


# A request's scope exists before its collection: built once, not timed.
_SCOPE: dict[str, Any] = {"type": "http"}


def for_request() -> StarletteBackgroundTasks:
    return TrackedBackgroundTasks.for_request(_SCOPE)


@dataclass
class Scenario:
    name: str
    func: Callable[[], Any]
    per_collection: int
    variants: dict[str, Factory]
    context: Callable[[], AbstractContextManager[None]] = nullcontext
    bgplus_func: Callable[[], Any] | None = None  # what bgplus runs instead of `func`

    def func_of(self, variant: str) -> Callable[[], Any]:
        if variant == "bgplus" and self.bgplus_func is not None:
            return self.bgplus_func
        return self.func


async def sample(make: Factory, func: Callable[[], Any], per_collection: int, n: int) -> float:
    """Nanoseconds per task over `n` collections of `per_collection` tasks."""
    gc.collect()
    started = time.perf_counter_ns()
    for _ in range(n):
        tasks = make()
        for _ in range(per_collection):
            tasks.add_task(func)
        await tasks()
    return (time.perf_counter_ns() - started) / (n * per_collection)


async def calibrate(scenario: Scenario, target_s: float) -> int:
    """Collections per sample, so that Starlette's sample lasts about `target_s`."""
    make = scenario.variants["starlette"]
    await sample(make, scenario.func, scenario.per_collection, 200)  # warm up
    ns = await sample(make, scenario.func, scenario.per_collection, 200)
    return max(20, int(target_s * 1e9 / (ns * scenario.per_collection)))


async def measure(scenario: Scenario, rounds: int, target_s: float) -> dict[str, list[float]]:
    """Each variant's ns per task, one sample per round (the rounds in order)."""
    n = await calibrate(scenario, target_s)
    names = list(scenario.variants)
    for name in names:  # warm up every variant once
        await sample(scenario.variants[name], scenario.func_of(name), scenario.per_collection, n)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(rounds):
        for name in rotated(names, round_no):
            func = scenario.func_of(name)
            ns = await sample(scenario.variants[name], func, scenario.per_collection, n)
            results[name].append(ns)
    return results


async def main(rounds: int, target_s: float, only: str, backend: str) -> None:
    tracker = TaskTracker()
    state: dict[str, Any] = {}

    scope = {"type": "http", "state": state}  # a request's, built before it is timed

    def bound() -> StarletteBackgroundTasks:
        # What get_background_tasks() does under the lifespan.
        return TrackedBackgroundTasks.for_request(scope)

    base: dict[str, Factory] = {
        "starlette": StarletteBackgroundTasks,
        "fastapi": fastapi.BackgroundTasks,
        "bgplus": TrackedBackgroundTasks,
    }
    scenarios = [
        Scenario("async no-op, 1 task/collection", noop, 1, base),
        Scenario("async no-op, 10 tasks/collection", noop, 10, base),
        Scenario("async no-op, 1 sync + 1 async receiver", noop, 1, base, receivers_connected),
        Scenario("sync no-op (thread hop), 1 task/collection", noop_sync, 1, base),
        Scenario("async no-op, TaskTracker bound", noop, 1, {**base, "bgplus": bound}),
        Scenario(
            "(floor: Starlette + the drain's hook, in the bgplus column)",
            noop,
            1,
            {**base, "bgplus": DrainHook},
        ),
        Scenario(
            "(floor: Starlette + the drain's hook + ids and books, in the bgplus column)",
            noop,
            1,
            {**base, "bgplus": Booked},
        ),
        Scenario(
            "(floor: the least tracked collection, _least.py, in the bgplus column)",
            noop,
            1,
            {**base, "bgplus": LeastTracked},
        ),
        Scenario("async no-op, @task(timeout=60.0)", noop, 1, base, bgplus_func=noop_timeout),
        Scenario(
            "async no-op, @task(attempts=3, retry_on=...)", noop, 1, base, bgplus_func=noop_retried
        ),
        Scenario(
            "async no-op, for_request, no span recording", noop, 1, {**base, "bgplus": for_request}
        ),
        Scenario(
            "async no-op, for_request, with a tracer recording",
            noop,
            1,
            {**base, "fastapi": FastAPITraced, "bgplus": for_request},
            tracer_recording,
        ),
    ]
    rows = []
    if backend == "asyncio":
        DrainHook.loop = asyncio.get_running_loop()
        on_asyncio(DrainHook.loop)
    async with tracker.lifespan(None) as lifespan_state:
        state.update(lifespan_state)
        for scenario in scenarios:
            if only not in scenario.name:
                continue
            with scenario.context():
                samples = await measure(scenario, rounds, target_s)
            result = {name: median(values) for name, values in samples.items()}
            ratio = result["bgplus"] / result["starlette"]
            # Each round's own ratio: both measured within milliseconds of each
            # other, so a neighbour's load moves them alike.
            pairs = zip(samples["bgplus"], samples["starlette"], strict=True)
            paired = median([ours / theirs for ours, theirs in pairs])
            rows.append(
                [
                    scenario.name,
                    f"{result['starlette']:,.0f}",
                    f"{result['fastapi']:,.0f}",
                    f"{result['bgplus']:,.0f}",
                    f"{ratio:.2f}x",
                    f"{paired:.2f}x",
                ]
            )
            print(f"  done: {scenario.name}", flush=True)
    print()
    print(
        table(
            [
                "scenario",
                "starlette ns/task",
                "fastapi ns/task",
                "bgplus ns/task",
                "bgplus/starlette",
                "per round: median",
            ],
            rows,
        )
    )
    print()
    print(
        "targets: bgplus/starlette <= 1.50x for async no-op tasks with no receiver"
        " connected, <= 2.00x with a TaskTracker bound"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25, help="rounds per scenario (25)")
    parser.add_argument(
        "--sample-ms", type=float, default=20, help="duration of one sample, in ms (20)"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--only", default="", help="run the scenarios whose name has this text")
    options = parser.parse_args()
    print_header(f"Per-task cost ({options.backend}, {options.rounds} rounds, interleaved)")
    anyio.run(
        main,
        options.rounds,
        options.sample_ms / 1000,
        options.only,
        options.backend,
        backend=options.backend,
    )
