"""Per-request cost: requests per second of a real endpoint under `wrk` (issue 4).

Serves `benchmarks/apps.py` with ONE uvicorn worker (``--no-access-log``,
httptools if installed, else h11) pinned to one core with `taskset`, and loads
it with `wrk` pinned to the other core, over loopback. The same endpoint (a
small JSON order validated by Pydantic, a JSON receipt) in three variants on
three paths of the same app: no task (``/plain``), one no-op async task through
`fastapi.BackgroundTasks` (``/fastapi``), one through
`fastapi_bgplus.BackgroundTasks` with the `TaskTracker` lifespan on (``/bgplus``).
A fourth path, ``/candidate``, measures a cheaper provider mechanism (see
`benchmarks/apps.py`). Routes are matched in that order, so each path pays
for one more failed match (about 2 us) than the one before it.

Every round runs each variant once, in a rotating order. The figures are the
medians over the rounds; the target is bgplus / fastapi >= 0.90 req/s.

Needs `wrk` (Debian/Ubuntu: ``apt-get install -y wrk``) and `taskset`
(util-linux). Run from the project root::

    .venv/bin/python benchmarks/per_request.py                 # 5 rounds x 10 s: ~4 min
    .venv/bin/python benchmarks/per_request.py --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

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

VARIANTS = ("plain", "fastapi", "bgplus", "candidate")

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


def main(rounds: int, duration: float, connections: int) -> None:
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
        f" {rounds} rounds x {len(VARIANTS)} variants x {duration:g} s",
        flush=True,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_uvicorn("apps:app", port, cpus=server_cpu, http=http)
    try:
        for variant in VARIANTS:  # the endpoints answer as expected before timing them
            response = httpx2.post(f"{base}/{variant}", json=ORDER)
            response.raise_for_status()
            assert response.json()["total"] == 42.9, response.text
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "post.lua"
            script.write_text(WRK_SCRIPT.format(body=json.dumps(ORDER)))
            for variant in VARIANTS:  # warm up
                wrk(
                    f"{base}/{variant}",
                    script,
                    duration=2,
                    connections=connections,
                    cpus=client_cpu,
                )
            results: dict[str, list[Result]] = {variant: [] for variant in VARIANTS}
            for round_no in range(rounds):
                for variant in rotated(VARIANTS, round_no):
                    result = wrk(
                        f"{base}/{variant}",
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
        stats = httpx2.get(f"{base}/stats").json()
    finally:
        stop(server)

    rps = {v: median([r.requests_per_s for r in results[v]]) for v in VARIANTS}
    rows = [
        [
            f"/{variant}",
            f"{rps[variant]:,.0f}",
            f"{rps[variant] / rps['fastapi']:.3f}",
            f"{median([r.p50_ms for r in results[variant]]):.2f}",
            f"{median([r.p99_ms for r in results[variant]]):.2f}",
        ]
        for variant in VARIANTS
    ]
    print()
    print(
        table(
            ["variant", "median req/s", "vs /fastapi", "p50 ms (median)", "p99 ms (median)"], rows
        )
    )
    print()
    ratio = rps["bgplus"] / rps["fastapi"]
    verdict = "met" if ratio >= 0.90 else "NOT met"
    print(f"bgplus / fastapi = {ratio:.3f} req/s (target >= 0.90: {verdict})")
    print(f"bgplus / plain   = {rps['bgplus'] / rps['plain']:.3f};")
    print(f"fastapi / plain  = {rps['fastapi'] / rps['plain']:.3f}")
    print(f"candidate / fastapi = {rps['candidate'] / rps['fastapi']:.3f}")
    ran = stats["ran"]
    print(
        f"tasks that ran: {ran['fastapi']:,} fastapi, {ran['bgplus']:,} bgplus,"
        f" {ran['candidate']:,} candidate"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    options = parser.parse_args()
    print_header("Per-request cost under wrk (interleaved)")
    main(options.rounds, options.duration, options.connections)
