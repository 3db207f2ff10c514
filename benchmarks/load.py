"""Load and fault run: every queued task is accounted for (issue 5).

Starts `benchmarks/load_app.py` under uvicorn in a subprocess on 127.0.0.1 (one
worker, TaskTracker on) and drives it over real HTTP, twice:

1. **load**: ``--requests`` requests (default 100,000) from ``--concurrency``
   concurrent clients (default 50), each queueing 1-3 async or sync tasks that
   record their id in an SQLite sink (WAL mode). The server's RSS is read from
   /proc at every tenth of the run and once the tasks have settled. Then a
   SIGTERM with time to drain.
2. **faults**: ``--fault-requests`` requests (default 20,000) with tasks that
   raise or are slow, a receiver that raises on every 7th signal, clients that
   disconnect right after sending or in the middle of the body, and a SIGTERM
   half way through with ``--timeout-graceful-shutdown 1`` and a 1 s drain.

Afterwards each phase checks, for every task the server queued (and every id
it returned): exactly one of done or failed (recorded by the task in the sink
and by a signal receiver) or abandoned (a ``task_abandoned`` signal and a
WARNING line naming its id on the server's stderr). Lost tasks, duplicates and
inconsistent records must all be 0. Exits non-zero otherwise.

Run it from the project root; it stops by itself (every wait is bounded)::

    .venv/bin/python benchmarks/load.py
    .venv/bin/python benchmarks/load.py --requests 20000 --fault-requests 5000  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx2

ROOT = Path(__file__).resolve().parent.parent
WARNING_LINE = re.compile(
    r"^WARNING fastapi_bgplus Background task ([0-9a-f]{32}) \((.*?)\) abandoned: (.*)$"
)
SUMMARY_LINE = re.compile(r"since startup: (\d+) done, (\d+) failed, (\d+) abandoned")
RECEIVER_FAILED_LINE = re.compile(r"^ERROR fastapi_bgplus Receiver .* raised; it was skipped")
CUT_REQUESTS_LINE = re.compile(r"Cancel (\d+) running task\(s\), timeout graceful shutdown")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_sink(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for table, column in (("queued", "kind"), ("outcomes", "outcome"), ("events", "signal")):
        conn.execute(f"CREATE TABLE {table} (task_id TEXT NOT NULL, {column} TEXT NOT NULL)")
    conn.close()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/<pid>/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} line")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(workdir: Path, sink: Path, *, faults: bool, drain: float, grace: float) -> Server:
    port = free_port()
    stderr_path = workdir / f"server-{'faults' if faults else 'load'}.log"
    env = {
        **os.environ,
        "BGPLUS_LOAD_SINK": str(sink),
        "BGPLUS_LOAD_FAULTS": "1" if faults else "0",
        "BGPLUS_LOAD_DRAIN": str(drain),
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable, "-m", "uvicorn", "load_app:app",
        "--app-dir", str(ROOT / "benchmarks"),
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--lifespan", "on",
        "--timeout-graceful-shutdown", str(grace),
    ]  # fmt: skip
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    server = Server(process, port, stderr_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early; see {stderr_path}")
        try:
            if httpx2.get(f"{server.url}/pid", timeout=1).json()["pid"] == process.pid:
                return server
        except httpx2.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start within 30 s")


def stop_server(server: Server, timeout: float = 60) -> int:
    """SIGTERM (if not sent yet) and wait; SIGKILL if it hangs. Returns the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(10)
        print(f"  !! the server did not exit within {timeout} s of SIGTERM: killed")
        return -9


def steady_plan(rng: random.Random) -> str:
    return "".join(rng.choice("as") for _ in range(rng.randint(1, 3)))


def fault_plan(rng: random.Random) -> str:
    return "".join(
        rng.choices("asfgwz", weights=[40, 30, 10, 10, 8, 2])[0] for _ in range(rng.randint(1, 4))
    )


@dataclass
class ClientStats:
    sent: int = 0
    completed: int = 0
    responses: int = 0
    disconnected_after_send: int = 0
    disconnected_mid_body: int = 0
    errors_before_sigterm: int = 0
    errors_after_sigterm: int = 0
    returned: list[str] = field(default_factory=list)
    rss: list[tuple[int, float]] = field(default_factory=list)
    rss_anon: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    max_in_flight: int = 0
    paused: int = 0
    elapsed: float = 0.0


async def raw_request(port: int, head: str, body: bytes) -> None:
    """Send bytes and hang up without reading the answer."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(head.encode() + body)


async def drive(
    server: Server,
    total: int,
    concurrency: int,
    plan: Callable[[random.Random], str],
    *,
    faults: bool,
    sigterm_at: int | None,
    rss_every: int | None,
    seed: int,
    max_in_flight: int,
) -> ClientStats:
    stats = ClientStats()
    rng = random.Random(seed)
    next_request = iter(range(total))
    sigterm_sent = False
    started = time.perf_counter()
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx2.AsyncClient, number: int) -> None:
        nonlocal sigterm_sent
        job = {"plan": plan(rng), "payload": f"user-{number}@example.com"}
        body = json.dumps(job).encode()
        roll = rng.random() if faults else 1.0
        stats.sent += 1
        if roll < 0.05:  # gone right after sending a whole request
            head = (
                f"POST /work HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            await raw_request(server.port, head, body)
            stats.disconnected_after_send += 1
        elif roll < 0.10:  # gone in the middle of the body
            head = (
                f"POST /work-then-read?plan={job['plan']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Length: {len(body) + 100}\r\n\r\n"
            )
            await raw_request(server.port, head, body)
            stats.disconnected_mid_body += 1
        else:
            if roll < 0.15:
                response = await client.post(
                    f"{server.url}/work-then-read", params={"plan": job["plan"]}, content=body
                )
            else:
                response = await client.post(f"{server.url}/work", json=job)
            response.raise_for_status()
            stats.returned.extend(response.json()["ids"])
            stats.responses += 1
        stats.completed += 1
        if rss_every and stats.completed % rss_every == 0:
            pid = server.process.pid
            stats.rss.append((stats.completed, rss_mb(pid)))
            stats.rss_anon.append(rss_mb(pid, "RssAnon"))
            stats.threads.append(int(rss_mb(pid, "Threads") * 1024))
            in_flight = (await client.get(f"{server.url}/stats")).json()["in_flight"]
            stats.in_flight.append(in_flight)
        if sigterm_at is not None and not sigterm_sent and stats.sent >= sigterm_at:
            sigterm_sent = True
            server.process.send_signal(signal.SIGTERM)

    go = anyio.Event()
    go.set()

    async def pace(client: httpx2.AsyncClient) -> None:
        # Background work runs after each response, so an open-loop client can
        # queue tasks faster than one worker runs them; the backlog would then
        # grow without bound (and so would memory). Hold the clients back
        # while the server has more than `max_in_flight` tasks in flight.
        nonlocal go
        while True:
            await anyio.sleep(0.05)
            try:
                in_flight = (await client.get(f"{server.url}/stats")).json()["in_flight"]
            except (OSError, httpx2.HTTPError):
                go.set()
                return
            stats.max_in_flight = max(stats.max_in_flight, in_flight)
            if in_flight > max_in_flight and go.is_set():
                go = anyio.Event()
                stats.paused += 1
            elif in_flight <= max_in_flight // 4 and not go.is_set():
                go.set()

    async def worker(client: httpx2.AsyncClient) -> None:
        for number in next_request:
            await go.wait()
            try:
                await one(client, number)
            except (OSError, TimeoutError, httpx2.HTTPError):
                if not sigterm_sent:
                    stats.errors_before_sigterm += 1
                    continue
                # The server is going away: this client is done.
                stats.errors_after_sigterm += 1
                return

    async with httpx2.AsyncClient(limits=limits, timeout=30) as client:
        with anyio.fail_after(3600):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pace, client)
                async with anyio.create_task_group() as workers:
                    for _ in range(concurrency):
                        workers.start_soon(worker, client)
                tg.cancel_scope.cancel()
    stats.elapsed = time.perf_counter() - started
    return stats


def wait_settled(sink: Path, timeout: float) -> bool:
    """Wait until every queued task has an end signal recorded."""
    conn = sqlite3.connect(sink)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            queued = conn.execute("SELECT COUNT(*) FROM queued").fetchone()[0]
            ended = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            if ended >= queued:
                return True
            time.sleep(0.2)
        return False
    finally:
        conn.close()


@dataclass
class Accounting:
    queued: int = 0
    done: int = 0
    failed: int = 0
    abandoned: int = 0
    abandoned_after_work: int = 0  # cut off, but its thread finished the work anyway
    lost: int = 0
    duplicates: int = 0
    inconsistent: int = 0
    returned: int = 0
    returned_unknown: int = 0
    returned_lost: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    summary: tuple[int, int, int] | None = None
    requests_cut: int = 0
    receiver_failures: int = 0
    recorded_equals_returned: bool = False
    examples: list[str] = field(default_factory=list)


def account(sink: Path, stderr_path: Path, returned: list[str]) -> Accounting:
    conn = sqlite3.connect(sink)
    queued_rows = conn.execute("SELECT task_id, kind FROM queued").fetchall()
    outcomes: defaultdict[str, list[str]] = defaultdict(list)
    for task_id, outcome in conn.execute("SELECT task_id, outcome FROM outcomes"):
        outcomes[task_id].append(outcome)
    events: defaultdict[str, list[str]] = defaultdict(list)
    for task_id, name in conn.execute("SELECT task_id, signal FROM events"):
        events[task_id].append(name)
    conn.close()

    warnings: Counter[str] = Counter()
    result = Accounting()
    for line in stderr_path.read_text(errors="replace").splitlines():
        if match := WARNING_LINE.match(line):
            warnings[match[1]] += 1
            result.reasons[match[3].split(";")[0]] += 1
        elif match := SUMMARY_LINE.search(line):
            result.summary = (int(match[1]), int(match[2]), int(match[3]))
        elif RECEIVER_FAILED_LINE.match(line):
            result.receiver_failures += 1
        elif match := CUT_REQUESTS_LINE.search(line):
            result.requests_cut = int(match[1])

    kinds: dict[str, str] = {}
    for task_id, kind in queued_rows:
        if task_id in kinds:
            result.duplicates += 1
        kinds[task_id] = kind
    result.queued = len(kinds)
    result.kinds = Counter(kinds.values())
    status: dict[str, str] = {}

    def flag(kind_of_problem: str, task_id: str) -> None:
        if len(result.examples) < 10:
            result.examples.append(
                f"{kind_of_problem} {task_id} kind={kinds.get(task_id)} events={events[task_id]}"
                f" outcomes={outcomes[task_id]} warnings={warnings[task_id]}"
            )

    for task_id, kind in kinds.items():
        ev, out, warned = events[task_id], outcomes[task_id], warnings[task_id]
        if len(ev) > 1 or len(out) > 1 or warned > 1:
            result.duplicates += 1
            flag("duplicate", task_id)
        if ev[:1] == ["completed"] and out[:1] == ["done"] and not warned and kind in "aswz":
            result.done += 1
            status[task_id] = "done"
        elif ev[:1] == ["failed"] and out[:1] == ["failed"] and not warned and kind in "fg":
            result.failed += 1
            status[task_id] = "failed"
        elif ev[:1] == ["abandoned"] and warned:
            result.abandoned += 1
            result.abandoned_after_work += bool(out)
            status[task_id] = "abandoned"
        elif not ev and not warned:
            result.lost += 1
            status[task_id] = "lost"
            flag("lost", task_id)
        else:
            result.inconsistent += 1
            status[task_id] = "inconsistent"
            flag("inconsistent", task_id)
    strays = (set(events) | set(outcomes) | set(warnings)) - set(kinds)
    result.inconsistent += len(strays)
    result.returned = len(returned)
    result.duplicates += len(returned) - len(set(returned))
    result.returned_unknown = sum(task_id not in kinds for task_id in returned)
    result.returned_lost = sum(status.get(task_id) == "lost" for task_id in returned)
    result.recorded_equals_returned = set(outcomes) == set(returned)
    return result


def report(
    name: str, stats: ClientStats, acc: Accounting, exit_code: int, stderr_path: Path
) -> list[str]:
    """Print the figures of one phase; return what went wrong."""
    print(f"\n== {name} ==")

    def line(label: str, value: object, note: str = "") -> None:
        text = f"{value:>9,}" if isinstance(value, int) else str(value)
        print(f"  {label:<24} {text}{'  ' + note if note else ''}")

    rate = stats.sent / stats.elapsed if stats.elapsed else 0.0
    line("requests sent", stats.sent, f"({stats.elapsed:.1f} s, {rate:,.0f} req/s)")
    line("most tasks in flight", stats.max_in_flight, f"(clients held back {stats.paused} times)")
    line("responses received", stats.responses)
    if stats.disconnected_after_send or stats.disconnected_mid_body:
        line("hung up after sending", stats.disconnected_after_send)
        line("hung up mid-body", stats.disconnected_mid_body)
    line("transport errors", stats.errors_before_sigterm, "before SIGTERM")
    line("", stats.errors_after_sigterm, "after SIGTERM")
    line("tasks queued", acc.queued, str(dict(sorted(acc.kinds.items()))))
    line("task ids returned", acc.returned)
    line("done", acc.done)
    line("failed", acc.failed)
    line(
        "abandoned",
        acc.abandoned,
        f"(of which {acc.abandoned_after_work:,} cut off while their thread finished the work)",
    )
    for reason, count in acc.reasons.most_common():
        print(f"      {count:>7,}  {reason}")
    line("lost", acc.lost, f"(returned ids among them: {acc.returned_lost})")
    line("duplicates", acc.duplicates)
    line("inconsistent records", acc.inconsistent)
    if acc.receiver_failures:
        line("receiver failures logged", acc.receiver_failures, "(every 7th signal)")
    if acc.requests_cut:
        line("requests cut by uvicorn", acc.requests_cut, "(timeout-graceful-shutdown)")
    line("tracker summary line", acc.summary, "(done, failed, abandoned)")
    line("server exit code", exit_code)
    for example in acc.examples:
        print(f"  !! {example}")
    problems = []
    if acc.lost or acc.duplicates or acc.inconsistent or acc.returned_unknown:
        problems.append(f"{name}: lost/duplicate/inconsistent/unknown records")
    if acc.summary != (acc.done, acc.failed, acc.abandoned):
        problems.append(f"{name}: the tracker's summary line disagrees with the sink")
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly.
    log = stderr_path.read_text(errors="replace")
    if exit_code not in (0, -signal.SIGTERM) or "Application shutdown complete" not in log:
        problems.append(f"{name}: the server did not shut down cleanly (exit code {exit_code})")
    if stats.errors_before_sigterm:
        problems.append(f"{name}: transport errors before SIGTERM")
    return problems


def load_phase(workdir: Path, args: argparse.Namespace) -> list[str]:
    sink = workdir / "load.sqlite"
    make_sink(sink)
    server = start_server(workdir, sink, faults=False, drain=30, grace=30)
    try:
        rss_start = rss_mb(server.process.pid)
        stats = anyio.run(
            lambda: drive(
                server,
                args.requests,
                args.concurrency,
                steady_plan,
                faults=False,
                sigterm_at=None,
                rss_every=max(args.requests // 10, 1),
                seed=args.seed,
                max_in_flight=args.max_in_flight,
            )
        )
        settled = wait_settled(sink, timeout=120)
        rss_settled = rss_mb(server.process.pid)
    finally:
        exit_code = stop_server(server)
    acc = account(sink, server.stderr_path, stats.returned)
    problems = report("load", stats, acc, exit_code, server.stderr_path)
    print(f"  ids recorded == returned {acc.recorded_equals_returned}")
    if not acc.recorded_equals_returned:
        problems.append("load: the ids the tasks recorded differ from the ids returned")
    if not settled:
        problems.append("load: tasks had not all ended 120 s after the last request")
    if acc.abandoned or acc.failed:
        problems.append("load: tasks failed or were abandoned without any fault injected")
    print(f"  server RSS (MB)          start {rss_start:.1f}; " + ", ".join(
        f"{n / 1000:g}k: {mb:.1f}" for n, mb in stats.rss
    ) + f"; settled: {rss_settled:.1f}")  # fmt: skip
    print("  of which anonymous (MB)  " + ", ".join(f"{mb:.1f}" for mb in stats.rss_anon))
    print(f"  server threads           {', '.join(map(str, stats.threads))}")
    print(f"  tasks in flight          {', '.join(map(str, stats.in_flight))}")
    # Flat: past the first fifth (tracker history full, thread pool and SQLite
    # caches warm), RSS grows by less than 5 %, or 5 MB, to the end.
    warm = [mb for n, mb in stats.rss if n >= args.requests // 5]
    if warm:
        growth = rss_settled - warm[0]
        print(f"  RSS growth after warm-up {growth:+.1f} MB")
        if growth > max(5.0, 0.05 * warm[0]):
            problems.append(f"load: RSS grew by {growth:.1f} MB after warm-up")
    return problems


def fault_phase(workdir: Path, args: argparse.Namespace) -> list[str]:
    sink = workdir / "faults.sqlite"
    make_sink(sink)
    server = start_server(workdir, sink, faults=True, drain=1.0, grace=1)
    try:
        stats = anyio.run(
            lambda: drive(
                server,
                args.fault_requests,
                args.concurrency,
                fault_plan,
                faults=True,
                sigterm_at=args.fault_requests // 2,
                rss_every=None,
                seed=args.seed + 1,
                max_in_flight=args.max_in_flight,
            )
        )
    finally:
        exit_code = stop_server(server)
    acc = account(sink, server.stderr_path, stats.returned)
    problems = report("faults (SIGTERM half way)", stats, acc, exit_code, server.stderr_path)
    if not acc.abandoned:
        problems.append("faults: the SIGTERM cut nothing off; the phase tested nothing")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--fault-requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=1000,
        help="hold the clients back while the server has more tasks than this in flight",
    )
    parser.add_argument("--no-faults", action="store_true", help="skip the fault phase")
    parser.add_argument("--keep", action="store_true", help="keep the sinks and server logs")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bgplus-load-"))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; sinks and logs in {workdir}")
    problems = load_phase(workdir, args)
    if not args.no_faults:
        problems += fault_phase(workdir, args)
    if not args.keep:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
    print()
    for problem in problems:
        print(f"FAILED: {problem}")
    if not problems:
        print("OK: every queued task is accounted for, none twice.")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
