"""Per-request cost: requests per second of a real endpoint under `wrk` (issue 4).

Serves `benchmarks/apps.py` with ONE uvicorn worker per variant (``--no-access-log``,
httptools if installed, else h11), every server pinned to the same core with
`taskset`, and loads one at a time with `wrk` pinned to the other core, over
loopback. The same endpoint (a small JSON order validated by Pydantic, a JSON
receipt) in these variants: no task (``plain``), one no-op async task through
`fastapi.BackgroundTasks` (``fastapi``), the same plus one plain FastAPI
dependency (``floor``: the least any `Depends` provider costs), one task through
`fastapi_bgplus.BackgroundTasks` with the `TaskTracker` lifespan on
(``bgplus``), the same with its collection not bound to the tracker
(``untracked``: what tracking costs), and ``bgplus`` again with a
`SQLiteStore` on the tracker (``sqlite``, issue 10: records written from
behind, in the same process). Each server has only its variant's route, first,
so that no variant pays for failed route matches (about 2 us each) that the
others do not.

Every round runs each variant once, in a rotating order. The figures are the
medians over the rounds; the target is bgplus / fastapi >= 0.90 req/s. Beside
them, the median of each round's own ratio to ``fastapi`` (both measured in
that round) and its range show how much a shared machine's load moved them.

Needs `wrk` (Debian/Ubuntu: ``apt-get install -y wrk``) and `taskset`
(util-linux). Run from the project root::

    .venv/bin/python benchmarks/per_request.py                 # 5 rounds x 10 s: ~4 min
    .venv/bin/python benchmarks/per_request.py --rounds 3 --duration 5
    .venv/bin/python benchmarks/per_request.py --variants floor --rounds 15 --duration 5   # ~5 min

``--variants`` loads only those named (``fastapi`` and ``bgplus`` always): more
rounds of the rows that matter in the same time.
    .venv/bin/python benchmarks/per_request.py --in-process --rounds 9   # ~1 min

``--in-process`` breaks the cost down by mechanism instead, without server or
network: one app and one route per mechanism (no task; `fastapi.BackgroundTasks`
alone, with any plain or ``yield`` dependency besides; our collection from a
plain or a ``yield`` dependency, without exit hooks; the shipped
`fastapi_bgplus.BackgroundTasks`, with and without the tracker), driven over
raw ASGI, in microseconds per request. The tracker lifespan is on throughout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
from _common import (
    asgi_request,
    free_port,
    http_implementation,
    median,
    print_header,
    rotated,
    start_uvicorn,
    stop,
    table,
)

from fastapi_bgplus import TaskTracker

VARIANTS = ("plain", "fastapi", "floor", "least", "bgplus", "untracked", "sqlite")

ORDER = {
    "customer_email": "ada@example.com",
    "items": [
        {"sku": "BOOK-0042", "quantity": 2, "unit_price": 12.5},
        {"sku": "PEN-0007", "quantity": 10, "unit_price": 0.99},
        {"sku": "MUG-0001", "quantity": 1, "unit_price": 8.0},
    ],
    "note": "gift wrap, please",
}

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"cannot read a wrk latency: {text!r}")
    return float(match[1]) * UNITS[match[2]]


def parse_wrk(output: str) -> Result:
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw failed requests:\n{output}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return Result(float(rps[1]), to_ms(p50[1]), to_ms(p99[1]))


def wrk(url: str, script: Path, *, duration: float, connections: int, cpus: str) -> Result:
    command = [
        "taskset", "-c", cpus, "wrk", "--latency",
        "-t", "1", "-c", str(connections), "-d", f"{duration:g}s",
        "-s", str(script), url,
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def main(rounds: int, duration: float, connections: int, variants: Sequence[str]) -> None:
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed; on Debian/Ubuntu: apt-get install -y {tool}"
            )
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs 2 cores: one for the server, one for wrk")
    server_cpu, client_cpu = str(cores[0]), str(cores[1])
    http = http_implementation()
    print(
        f"uvicorn: 1 worker, --http {http}, --no-access-log, on core {server_cpu};"
        f" wrk: 1 thread, {connections} connections, on core {client_cpu};"
        f" {rounds} rounds x {len(variants)} variants x {duration:g} s",
        flush=True,
    )
    store_dir = tempfile.TemporaryDirectory()
    servers: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for variant in variants:
            port = free_port()
            only = "bgplus" if variant == "sqlite" else variant
            env = {"BGPLUS_BENCH_ONLY": only}  # read by apps.py
            if variant == "sqlite":
                env["BGPLUS_BENCH_SQLITE"] = f"{store_dir.name}/tasks.db"
            servers[variant] = start_uvicorn("apps:app", port, cpus=server_cpu, http=http, env=env)
            urls[variant] = f"http://127.0.0.1:{port}/{only}"
        for variant in variants:  # the endpoints answer as expected before timing them
            response = httpx2.post(urls[variant], json=ORDER)
            response.raise_for_status()
            assert response.json()["total"] == 42.9, response.text
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "post.lua"
            script.write_text(WRK_SCRIPT.format(body=json.dumps(ORDER)))
            for variant in variants:  # warm up
                wrk(
                    urls[variant],
                    script,
                    duration=2,
                    connections=connections,
                    cpus=client_cpu,
                )
            results: dict[str, list[Result]] = {variant: [] for variant in variants}
            for round_no in range(rounds):
                for variant in rotated(variants, round_no):
                    result = wrk(
                        urls[variant],
                        script,
                        duration=duration,
                        connections=connections,
                        cpus=client_cpu,
                    )
                    results[variant].append(result)
                    print(
                        f"  round {round_no + 1} {variant:8s} {result.requests_per_s:9,.0f} req/s"
                        f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms",
                        flush=True,
                    )
        ran = {
            variant: httpx2.get(urls[variant].rsplit("/", 1)[0] + "/stats").json()["ran"][variant]
            for variant in ("fastapi", "bgplus", "untracked")
            if variant in variants
        }
    finally:
        for server in servers.values():
            stop(server)
        store_dir.cleanup()

    rps = {v: median([r.requests_per_s for r in results[v]]) for v in variants}
    # Each round's ratio, the variant against /fastapi measured in the same
    # round: a load that drifts on a shared machine moves both alike.
    paired = {
        v: sorted(
            r.requests_per_s / f.requests_per_s
            for r, f in zip(results[v], results["fastapi"], strict=True)
        )
        for v in variants
    }  # the verdict stays on the ratio of the medians, as the target is written
    rows = [
        [
            f"/{variant}",
            f"{rps[variant]:,.0f}",
            f"{rps[variant] / rps['fastapi']:.3f}",
            f"{median(paired[variant]):.3f} ({paired[variant][0]:.3f}-{paired[variant][-1]:.3f})",
            f"{median([r.p50_ms for r in results[variant]]):.2f}",
            f"{median([r.p99_ms for r in results[variant]]):.2f}",
        ]
        for variant in variants
    ]
    print()
    print(
        table(
            [
                "variant",
                "median req/s",
                "vs /fastapi",
                "per round vs /fastapi: median (range)",
                "p50 ms (median)",
                "p99 ms (median)",
            ],
            rows,
        )
    )
    print()
    ratio = rps["bgplus"] / rps["fastapi"]
    verdict = "met" if ratio >= 0.90 else "NOT met"
    print(
        f"bgplus / fastapi = {ratio:.3f} req/s (target >= 0.90: {verdict});"
        f" the median of the rounds' own ratios: {median(paired['bgplus']):.3f}"
    )
    for line, (over, under) in {
        "bgplus / plain": ("bgplus", "plain"),
        "fastapi / plain": ("fastapi", "plain"),
        "untracked / fastapi": ("untracked", "fastapi"),
        "sqlite / bgplus (the SQLiteStore's cost)": ("sqlite", "bgplus"),
        "floor / fastapi (fastapi + one plain dependency)": ("floor", "fastapi"),
    }.items():
        if over in rps and under in rps:
            print(f"{line}: {rps[over] / rps[under]:.3f}")
    print("tasks that ran: " + ", ".join(f"{count:,} {name}" for name, count in ran.items()))


# In-process breakdown: no server, no network, raw ASGI calls.


async def asgi_post(app: Any, state: dict[str, Any], body: bytes) -> int:
    """POST `body` to ``/x`` of `app` over raw ASGI; returns the status code."""
    return await asgi_request(app, state, "POST", "/x", body)


async def in_process(rounds: int, requests: int) -> None:
    import apps  # the server's module, imported here only

    body = json.dumps(ORDER).encode()
    labels = list(apps.MECHANISMS)
    served: dict[str, tuple[Any, dict[str, Any]]] = {}
    async with AsyncExitStack() as stack:
        for label in labels:
            app = apps.mechanism_app(label)
            served[label] = (app, await stack.enter_async_context(TaskTracker().lifespan(app)))
            for _ in range(200):  # warm up, and check the endpoint answers
                assert await asgi_post(app, served[label][1], body) == 200, label
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for round_no in range(rounds):
            for label in rotated(labels, round_no):
                app, state = served[label]
                gc.collect()
                started = time.perf_counter()
                for _ in range(requests):
                    await asgi_post(app, state, body)
                samples[label].append((time.perf_counter() - started) / requests * 1e6)
    us = {label: median(values) for label, values in samples.items()}
    base = us["fastapi"]
    rows = [[label, f"{us[label]:.1f}", f"{us[label] - base:+.1f}"] for label in labels]
    print(table(["mechanism (one app, one route each)", "us/request", "vs fastapi"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="instead: break the cost down by mechanism over raw ASGI, no server (~1 min)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="per sample, --in-process")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="the variants to load, comma-separated; fastapi and bgplus always (all)",
    )
    options = parser.parse_args()
    chosen = [v for v in VARIANTS if v in {*options.variants.split(","), "fastapi", "bgplus"}]
    if options.in_process:
        print_header(f"Per-request cost in-process, by mechanism ({options.rounds} rounds)")
        anyio.run(in_process, options.rounds, options.requests)
    else:
        print_header("Per-request cost under wrk (interleaved)")
        main(options.rounds, options.duration, options.connections, chosen)
