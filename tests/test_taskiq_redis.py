"""taskiq with real parts (issue 11): a real redis-server, taskiq-redis's
`RedisStreamBroker` (it acknowledges a message once its task has run), the web
app under uvicorn and ``taskiq worker`` in subprocesses.

The web app is tests/apps/taskiq_app.py, the worker tests/apps/taskiq_worker.py;
each test gets a stream and store prefix of its own on the session's Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import redis

from ._servers import Server, free_port, serve, spawn
from .conftest import NEEDS_TASKIQ_REDIS_1_1

if NEEDS_TASKIQ_REDIS_1_1.args[0]:
    pytest.skip(NEEDS_TASKIQ_REDIS_1_1.kwargs["reason"], allow_module_level=True)

from .apps.taskiq_worker import IDLE_TIMEOUT_MS  # after the skip: it imports taskiq_redis
from .redis_server import RedisServer

pytestmark = pytest.mark.slow

T = TypeVar("T")

POLL_S = 0.02
FINAL = ("done", "failed", "cancelled", "lost")
TRACE_ID = "5ce0e9a56015fec5aadfa328ae398115"


def until(check: Callable[[], T | None], seconds: float, what: str) -> T:
    """Poll `check` (another process's state) until it answers, for a bounded time."""
    deadline = time.monotonic() + seconds
    while (answer := check()) is None or answer is False:
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(POLL_S)
    return answer


class Deployment:
    """One test's stream on the session's Redis, its markers, its processes."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.queue = f"q{uuid.uuid4().hex[:12]}"
        self.markers = tmp_path / "markers"  # created by `serve`
        self.redis = redis.Redis.from_url(url)

    def env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REDIS_URL", self.url)
        monkeypatch.setenv("BGPLUS_QUEUE", self.queue)
        monkeypatch.setenv("BGPLUS_LEASE_TTL", "1")

    @contextmanager
    def web(self) -> Iterator[Server]:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", "tests.apps.taskiq_app:from_env"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        with serve(self.tmp_path, command, f"http://127.0.0.1:{port}") as server:
            yield server

    @contextmanager
    def worker(
        self, name: str, target: str = "tests.apps.taskiq_worker:from_env"
    ) -> Iterator[subprocess.Popen[bytes]]:
        """``taskiq worker`` in a session of its own, its output in ``{name}.log``;
        with the test worker, ready once its startup ran (it writes a
        ``ready.PID`` marker)."""
        ready_before = len(list(self.markers.glob("ready.*")))
        command = [sys.executable, "-m", "taskiq", "worker", target, "--workers", "1"]
        command += ["--max-async-tasks", "20", "--shutdown-timeout", "1"]

        def ready() -> bool:
            if not target.startswith("tests."):
                return True  # another worker writes no marker: not waited for
            return len(list(self.markers.glob("ready.*"))) > ready_before

        log = self.tmp_path / f"{name}.log"
        env = {"BGPLUS_MARKERS": str(self.markers)}
        with spawn(command, log, ready, env) as process:
            yield process

    def lines(self, name: str) -> list[str]:
        path = self.markers / name
        return path.read_text().splitlines() if path.exists() else []

    def records(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        raw = self.redis.mget([f"{self.queue}:task:{task_id}" for task_id in task_ids])
        return [json.loads(value) if value is not None else None for value in raw]


@pytest.fixture
def deployment(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    deployment = Deployment(redis_server.url, tmp_path)
    deployment.env(monkeypatch)
    yield deployment
    deployment.redis.close()


def follow(client: httpx2.Client, task_id: str) -> list[str]:
    """The statuses ``GET /tasks/{id}`` answers until a final one, each once."""
    seen: list[str] = []

    def final() -> bool:
        response = client.get(f"/tasks/{task_id}")
        status = response.json()["status"] if response.status_code == 200 else "unknown"
        if not seen or seen[-1] != status:
            seen.append(status)
        return status in FINAL

    until(final, 15, f"task {task_id} to end; seen {seen}")
    return seen


def test_the_same_endpoint_in_process_and_through_taskiq(deployment: Deployment) -> None:
    traceparent = f"00-{TRACE_ID}-ab54a98ceb1f0ad2-01"
    runs: dict[tuple[str, bool], tuple[dict[str, str], list[str]]] = {}
    with (
        deployment.web() as server,
        deployment.worker("worker"),
        httpx2.Client(base_url=server.url) as client,
    ):
        for kind in ("local", "taskiq"):
            for fail in (False, True):
                key = f"{kind}-{'fail' if fail else 'ok'}"
                params: dict[str, Any] = {"kind": kind, "key": key, "seconds": 0.3}
                params |= {"fail": fail, "trace": traceparent}
                response = client.post("/run", params=params)
                assert response.status_code == 200, server.log.read_text()
                body = response.json()
                runs[kind, fail] = (body, follow(client, body["task_id"]))

    for (kind, fail), (body, seen) in runs.items():
        end = "failed" if fail else "done"
        assert body["status"] == "pending", (kind, body)  # at response time, both
        # Every status seen, in the order of the lifecycle, ending where it must:
        # `pending` only shows while a message waits for the worker.
        assert seen[-1] == end, (kind, seen)
        assert "running" in seen, (kind, seen)
        assert seen == [s for s in ("pending", "running", end) if s in seen], (kind, seen)

    # The taskiq tasks' signals fired in the worker, the broker their sender.
    signals = Counter(deployment.lines("signals.log"))
    ok_id = runs["taskiq", False][0]["task_id"]
    failed_id = runs["taskiq", True][0]["task_id"]
    assert signals == Counter(
        [
            f"task_started {ok_id}",
            f"task_completed {ok_id}",
            f"task_started {failed_id}",
            f"task_failed {failed_id}",
        ]
    )
    (failed,) = deployment.records([failed_id])
    assert failed is not None
    assert failed["error"] == "ValueError"
    assert "failed" not in json.dumps({k: v for k, v in failed.items() if k != "status"})
    # The request's trace context reached the task, in-process and in the worker.
    assert sorted(deployment.lines("trace.log")) == [
        f"{key} {TRACE_ID}" for key in ("local-fail", "local-ok", "taskiq-fail", "taskiq-ok")
    ]


def test_a_failed_request_never_sends_its_taskiq_task(deployment: Deployment) -> None:
    with deployment.web() as server, httpx2.Client(base_url=server.url) as client:
        assert client.post("/boom").status_code == 500
        abandoned = "(tests.work) abandoned: the request failed with RuntimeError"
        until(lambda: abandoned in server.log.read_text(), 10, "the task to be abandoned")
        # Nothing reached the stream, and nothing will: its request is over.
        assert deployment.redis.xlen(deployment.queue) == 0
        # The control: a request that succeeds sends its task (after the response).
        # (A new connection: uvicorn closes one whose request raised.)
        params = {"kind": "taskiq", "key": "sent"}
        httpx2.post(f"{server.url}/run", params=params).raise_for_status()
        until(lambda: deployment.redis.xlen(deployment.queue) == 1, 10, "the message")


def test_a_worker_killed_mid_queue_loses_no_task(deployment: Deployment) -> None:
    """SIGKILL a worker while 200 tasks are queued and some run; a new worker
    runs the rest. Every task ends done, once in the store; a task cut mid-run
    runs again (at-least-once)."""
    count = 200
    with deployment.web() as server, httpx2.Client(base_url=server.url) as client:
        response = client.post("/batch", params={"n": count, "seconds": 0.1})
        ids: list[str] = response.json()
        keys = {f"b{i}": task_id for i, task_id in enumerate(ids)}
        until(lambda: deployment.redis.xlen(deployment.queue) == count, 10, "200 messages")

        with deployment.worker("worker-1") as first:

            def mid_queue() -> bool:
                runs = Counter(line.split()[0] for line in deployment.lines("runs.log"))
                return runs["end"] >= 40 and runs["start"] - runs["end"] >= 5

            until(mid_queue, 10, "40 tasks done and 5 running")
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        at_kill = Counter(line.split()[0] for line in deployment.lines("runs.log"))
        started = {line.split()[1] for line in deployment.lines("runs.log") if "start" in line}
        ended = {line.split()[1] for line in deployment.lines("runs.log") if "end" in line}
        cut = sorted(started - ended)
        assert cut, "no task was running at the kill"

        # Its lease lapses (1 s here): a task it was running reads `lost`.
        lost_id = keys[cut[0]]
        until(
            lambda: client.get(f"/tasks/{lost_id}").json()["status"] == "lost",
            3,
            "the cut task to read lost",
        )

        # taskiq-redis (1.2) reclaims a dead consumer's messages once they have
        # been idle for `idle_timeout`, and only when a read returns new
        # messages: wait out the idle time, then start a worker and send one
        # more message (the nudge the README recommends for a quiet stream).
        idle_ms = IDLE_TIMEOUT_MS + 100

        def held_are_idle() -> bool:
            held = deployment.redis.xpending_range(
                deployment.queue, deployment.queue, min="-", max="+", count=count
            )
            return bool(held) and all(
                int(entry["time_since_delivered"]) >= idle_ms for entry in held
            )

        until(held_are_idle, 10, "the killed worker's messages to be idle")
        with deployment.worker("worker-2"):
            params = {"kind": "taskiq", "key": "nudge"}
            client.post("/run", params=params).raise_for_status()

            def all_final() -> list[dict[str, Any]] | None:
                records = deployment.records(ids)
                if all(r is not None and r["status"] in FINAL for r in records):
                    return [r for r in records if r is not None]
                return None

            records = until(all_final, 30, "every task to end")

    runs = deployment.lines("runs.log")
    starts = Counter(line.split()[1] for line in runs if line.startswith("start b"))
    ends = Counter(line.split()[1] for line in runs if line.startswith("end b"))
    completed = Counter(
        line.split()[1] for line in deployment.lines("signals.log") if "completed" in line
    )
    # None lost: every task ran to its end, and reads done, once, in the store.
    assert [r["status"] for r in records] == ["done"] * count
    assert set(ends) == set(keys)
    assert len({r["task_id"] for r in records}) == count
    ran_again = sorted(key for key, n in starts.items() if n > 1)
    completed_twice = sorted(key for key, n in ends.items() if n > 1)
    # At-least-once: only tasks the killed worker held (delivered, not yet
    # acknowledged) may run again; those cut mid-run must. One that had ended
    # but was not yet acknowledged runs to completion twice.
    assert set(cut) <= set(ran_again)
    assert set(completed_twice) <= set(ran_again)
    assert len(ran_again) <= at_kill["start"] - at_kill["end"] + 20
    by_id = {keys[key]: n for key, n in starts.items()}
    for record in records:
        # One attempt per delivery that reached the middleware (a run, or one cut
        # between the middleware and the task's first line).
        assert record["attempts"] >= by_id[record["task_id"]], record
    print(
        f"\nqueued {count}; at SIGKILL: {at_kill['start']} started, {at_kill['end']} done,"
        f" {len(cut)} cut mid-run; after restart: all {count} done (0 lost);"
        f" ran again: {len(ran_again)}; completed twice: {len(completed_twice)};"
        f" task_completed signals: {sum(completed.values())} for {len(completed)} tasks"
    )


def test_the_taskiq_example_runs_against_redis(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    deployment = Deployment(redis_server.url, tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "examples.taskiq_app:app"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with (
        serve(tmp_path, command, f"http://127.0.0.1:{port}", ready_path="/docs") as server,
        deployment.worker("example-worker", "examples.taskiq_worker:broker"),
        httpx2.Client(base_url=server.url) as client,
    ):
        response = client.post("/users", json={"email": "ada@example.com"})
        assert response.status_code == 201, server.log.read_text()
        task_id = response.json()["task_id"]
        seen = follow(client, task_id)
        assert client.get(f"/tasks/{'0' * 32}").status_code == 404
    assert seen[-1] == "done"
    assert "running" in seen
    worker_log = (tmp_path / "example-worker.log").read_text()
    assert f"task {task_id} done in" in worker_log
    assert "ada@example.com" not in worker_log
    assert "ada@example.com" not in server.log.read_text()


@pytest.mark.parametrize("survivors", [1, 2])
def test_a_dead_workers_tasks_run_again_with_no_new_traffic(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, survivors: int
) -> None:
    """`ReclaimingRedisStreamBroker`: SIGKILL the worker holding tasks (running
    and prefetched), send nothing more, start `survivors` workers: every task
    runs again within about `idle_timeout` plus a read, and its record goes from
    `lost` to `running` to `done` under the same id."""
    monkeypatch.setenv("BGPLUS_BROKER", "reclaiming")
    count = 60
    with deployment.web() as server, httpx2.Client(base_url=server.url) as client:
        ids: list[str] = client.post("/batch", params={"n": count, "seconds": 0.3}).json()
        keys = {f"b{i}": task_id for i, task_id in enumerate(ids)}
        with deployment.worker("worker-1") as first:

            def mid_queue() -> bool:
                runs = Counter(line.split()[0] for line in deployment.lines("runs.log"))
                return runs["end"] >= 10 and runs["start"] - runs["end"] >= 5

            until(mid_queue, 10, "10 tasks done and 5 running")
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        started = {line.split()[1] for line in deployment.lines("runs.log") if "start" in line}
        ended = {line.split()[1] for line in deployment.lines("runs.log") if "end" in line}
        cut = sorted(started - ended)
        lost_id = keys[cut[0]]
        until(
            lambda: client.get(f"/tasks/{lost_id}").json()["status"] == "lost",
            3,
            "a cut task to read lost",
        )
        seen = ["lost"]  # then polled while the new workers start and run it

        def all_done() -> list[dict[str, Any]] | None:
            status = client.get(f"/tasks/{lost_id}").json()["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            records = deployment.records(ids)
            if all(r is not None and r["status"] in FINAL for r in records):
                return [r for r in records if r is not None]
            return None

        with contextlib.ExitStack() as workers:
            restarted = time.monotonic()
            for number in range(survivors):
                workers.enter_context(deployment.worker(f"worker-{number + 2}"))
            bound = IDLE_TIMEOUT_MS / 1000 + 10  # idle_timeout, reads, the tasks themselves
            records = until(all_done, bound, "every task to run again, with no new message")
            recovered = time.monotonic() - restarted
    assert [r["status"] for r in records] == ["done"] * count
    assert seen[-1] == "done"
    assert "running" in seen or seen == ["lost", "done"]  # a short run may fall between polls
    by_key = dict(zip(keys, records, strict=True))
    for key in cut:
        assert by_key[key]["attempts"] >= 2, by_key[key]  # counted by the middleware
    ends = Counter(line.split()[1] for line in deployment.lines("runs.log") if "end" in line)
    assert set(ends) == set(keys)
    print(
        f"\n{survivors} survivor(s): {len(cut)} cut mid-run, all {count} done"
        f" {recovered:.1f} s after the restart (idle_timeout {IDLE_TIMEOUT_MS / 1000} s);"
        f" ran twice to the end: {sum(1 for n in ends.values() if n > 1)}; {lost_id}: {seen}"
    )


def test_the_reclaiming_broker_takes_a_dead_consumers_messages_on_a_quiet_stream(
    redis_server: RedisServer,
) -> None:
    """Three messages taken by a consumer that died (never acknowledged), and
    nothing sent after: taskiq-redis's own broker hands out nothing (upstream
    issue #131: if this starts failing, the shim can go), only a message sent
    later; the reclaiming one hands the three out, once idle for `idle_timeout`.

    No read is cancelled here: a cancelled read is what redis-py can swallow
    (the SIGTERM test); each generator is closed while it waits at a yield."""
    import asyncio

    import redis.asyncio
    from taskiq.message import BrokerMessage
    from taskiq_redis import RedisStreamBroker

    from fastapi_bgplus.taskiq_redis import DEFAULT_LOCK_TIMEOUT, ReclaimingRedisStreamBroker

    async def kick(broker: RedisStreamBroker, body: bytes) -> None:
        message = BrokerMessage(task_id="t", task_name="tests.work", message=body, labels={})
        await broker.kick(message)

    async def scenario() -> tuple[bool, bytes, list[bytes], int]:
        queue = f"q{uuid.uuid4().hex[:12]}"
        options: dict[str, Any] = {
            "queue_name": queue,
            "consumer_group_name": queue,
            "xread_block": 100,
            "idle_timeout": 200,
        }
        sender = RedisStreamBroker(redis_server.url, **options)
        await sender.startup()
        for n in range(3):
            await kick(sender, f"m{n}".encode())
        raw = redis.asyncio.Redis.from_url(redis_server.url)
        await raw.xreadgroup(queue, "dead-worker", {queue: ">"}, count=10)  # then it died
        await asyncio.sleep(0.3)  # past idle_timeout

        upstream = RedisStreamBroker(redis_server.url, **options)
        await upstream.startup()
        listening = upstream.listen()
        first = asyncio.ensure_future(anext(listening))
        await asyncio.sleep(1.0)
        quiet = not first.done()  # ten reads later, nothing handed out
        await kick(sender, b"nudge")
        nudge = await first
        await nudge.ack()  # type: ignore[misc]
        nudged = nudge.data
        await listening.aclose()
        await upstream.shutdown()

        reclaiming = ReclaimingRedisStreamBroker(redis_server.url, **options)
        assert reclaiming.unacknowledged_lock_timeout == DEFAULT_LOCK_TIMEOUT
        kept = ReclaimingRedisStreamBroker(redis_server.url, unacknowledged_lock_timeout=2.5)
        assert kept.unacknowledged_lock_timeout == 2.5
        await reclaiming.startup()
        recovered: list[bytes] = []
        listening = reclaiming.listen()
        while len(recovered) < 3:
            step = asyncio.ensure_future(anext(listening))
            await asyncio.wait({step}, timeout=5.0)
            assert step.done(), f"only {recovered} recovered in time"
            message = step.result()
            recovered.append(message.data)
            await message.ack()  # type: ignore[misc]
        # A read cancelled while it waits ends the generator's task at once.
        waiting = asyncio.ensure_future(anext(listening))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.wait({waiting}, timeout=5.0)
        assert waiting.cancelled()
        listening = reclaiming.listen()
        # New messages come as before, read after read.
        for body in (b"fresh", b"fresher"):
            await kick(sender, body)
            step = asyncio.ensure_future(anext(listening))
            await asyncio.wait({step}, timeout=5.0)
            assert step.done(), "a new message never came"
            fresh = step.result()
            await fresh.ack()  # type: ignore[misc]
            recovered.append(fresh.data)
        await listening.aclose()
        await reclaiming.shutdown()
        await sender.shutdown()
        left = (await raw.xpending(queue, queue))["pending"]
        await raw.aclose()
        return quiet, nudged, recovered, left

    quiet, nudged, recovered, left = asyncio.run(scenario())
    assert quiet
    assert nudged == b"nudge"  # only what was sent after
    assert sorted(recovered[:3]) == [b"m0", b"m1", b"m2"]
    assert recovered[3:] == [b"fresh", b"fresher"]
    assert left == 0  # each acknowledged by the consumer that took it over


def logged(deployment: Deployment, line: str) -> Callable[[], bool]:
    return lambda: line in deployment.lines("runs.log")


def test_a_reclaiming_worker_stops_soon_after_sigterm(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """taskiq-redis's own broker can leave ``taskiq worker`` deaf to SIGTERM
    (a cancelled read that redis-py swallows); the reclaiming broker stops
    within a couple of reads (``xread_block`` is 0.2 s here), after the task
    it runs has finished."""
    monkeypatch.setenv("BGPLUS_BROKER", "reclaiming")
    with deployment.web() as server, httpx2.Client(base_url=server.url) as client:
        for round_no in range(3):
            with deployment.worker(f"worker-{round_no}") as worker:
                key = f"term{round_no}"
                params: dict[str, Any] = {"kind": "taskiq", "key": key, "seconds": 0.5}
                client.post("/run", params=params).raise_for_status()
                until(logged(deployment, f"start {key}"), 10, "the task to start")
                sent = time.monotonic()
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=15)
                stopped = time.monotonic() - sent
                assert f"end {key}" in deployment.lines("runs.log")  # it ran to its end
                assert stopped < 5.0, stopped
                print(f"\nstopped {stopped:.1f} s after SIGTERM")
