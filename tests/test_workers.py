"""Several uvicorn workers share one task store (issue 10).

A real ``uvicorn --workers 3`` in a subprocess serves `tests/apps/workers.py`,
with a `SQLiteStore` and with a `RedisStore` (on the session's redis-server);
every request opens a new connection, so the kernel spreads them over the
workers. Every task id is looked up many times: none answers 404 once the
write interval has passed, and each shows its final status. Then a worker is
killed with SIGKILL while its task runs: another worker answers "lost" for
that task within the lease.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from ._servers import Server, uvicorn
from .redis_server import RedisServer

pytestmark = pytest.mark.slow

LEASE_TTL = 1.0
WORKERS = 3


def lookup(server: Server, task_id: str) -> httpx2.Response:
    return httpx2.get(f"{server.url}/tasks/{task_id}", timeout=5.0)


def wait_for_workers(server: Server, count: int) -> set[str]:
    """Pids of the workers answering, once `count` of them have (bounded)."""
    pids: set[str] = set()
    deadline = time.monotonic() + 20.0
    while len(pids) < count:
        assert time.monotonic() < deadline, f"only {len(pids)} worker(s) answered"
        pids.add(httpx2.get(f"{server.url}/health").headers["x-worker-pid"])
    return pids


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of each store the workers share (``BGPLUS_STORE``)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    return f"sqlite://{tmp_path}/tasks.db"


def test_every_worker_answers_for_every_task_and_a_killed_workers_task_is_lost(
    tmp_path: Path, store_url: str
) -> None:
    env = {"BGPLUS_STORE": store_url, "BGPLUS_LEASE_TTL": str(LEASE_TTL)}
    with uvicorn(
        tmp_path, "--workers", str(WORKERS), app="tests.apps.workers:app", env=env
    ) as server:
        pids = wait_for_workers(server, WORKERS)

        expected: dict[str, str] = {}
        queued_by: Counter[str] = Counter()
        for index in range(30):
            response = httpx2.post(f"{server.url}/queue", params={"count": 2, "seconds": 0.05})
            response.raise_for_status()
            queued_by[response.headers["x-worker-pid"]] += 1
            expected.update(dict.fromkeys(response.json(), "done"))
            if index % 10 == 0:
                response = httpx2.post(f"{server.url}/fail")
                expected[response.json()] = "failed"
        assert len(queued_by) > 1, queued_by

        time.sleep(1.0)  # the spec's bound: statuses show within one second
        answers: Counter[int] = Counter()
        answered_by: Counter[str] = Counter()
        wrong = []
        for _ in range(5):
            for task_id, status in expected.items():
                response = lookup(server, task_id)
                answers[response.status_code] += 1
                answered_by[response.headers["x-worker-pid"]] += 1
                if response.status_code == 200 and response.json()["status"] != status:
                    wrong.append(response.json())
        assert answers == {200: 5 * len(expected)}, answers
        assert wrong == []
        assert set(answered_by) == pids, answered_by

        # A worker dies while its task runs.
        response = httpx2.post(f"{server.url}/queue", params={"count": 1, "seconds": 60})
        (task_id,) = response.json()
        victim = int(response.headers["x-worker-pid"])
        deadline = time.monotonic() + 5.0
        while True:  # until another worker answers "running": the store has it
            response = lookup(server, task_id)
            other = response.headers["x-worker-pid"] != str(victim)
            if other and response.json().get("status") == "running":
                break
            assert time.monotonic() < deadline, "the task never showed as running"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            response = lookup(server, task_id)
            status = response.json().get("status")
            if status == "lost":
                break
            assert time.monotonic() - killed < LEASE_TTL + 1.0, (response.status_code, status)
            time.sleep(0.05)
        assert int(response.headers["x-worker-pid"]) != victim
        elapsed = time.monotonic() - killed
        print(f"lookups: {answers}, by worker: {dict(answered_by)}; lost after {elapsed:.2f} s")


@contextmanager
def connection_to_another_worker(server: Server, pid: str) -> Iterator[httpx2.Client]:
    """A kept-alive connection answered by a worker other than `pid` (so
    every request sent on it reaches that worker)."""
    deadline = time.monotonic() + 10.0
    while True:
        client = httpx2.Client(base_url=server.url)
        if client.get("/health").headers["x-worker-pid"] != pid:
            break
        client.close()
        assert time.monotonic() < deadline, "no connection reached another worker"
    try:
        yield client
    finally:
        client.close()


def test_the_list_and_a_cancel_reach_the_tasks_of_the_other_worker(
    tmp_path: Path, store_url: str
) -> None:
    env = {"BGPLUS_STORE": store_url}
    with uvicorn(tmp_path, "--workers", "2", app="tests.apps.workers:app", env=env) as server:
        wait_for_workers(server, 2)
        response = httpx2.post(f"{server.url}/queue", params={"count": 1, "seconds": 60})
        (task_id,) = response.json()
        runner = response.headers["x-worker-pid"]
        with connection_to_another_worker(server, runner) as other:
            deadline = time.monotonic() + 5.0
            while True:  # the other worker lists it as running
                listed = other.get("/tasks", params={"status": "running"})
                if task_id in [record["task_id"] for record in listed.json()["items"]]:
                    break
                assert time.monotonic() < deadline, "the other worker never listed it"
                time.sleep(0.05)
            cancel = other.post(f"/tasks/{task_id}/cancel", headers={"X-Requested-With": "test"})
            assert cancel.status_code == 202, cancel.text
            assert cancel.headers["x-worker-pid"] != runner
            asked = time.monotonic()
            while other.get(f"/tasks/{task_id}").json()["status"] != "cancelled":
                assert time.monotonic() - asked < 2.0, "the cancel never reached the task"
                time.sleep(0.05)
            print(f"cancelled from the other worker in {time.monotonic() - asked:.2f} s")
            stats = other.get("/tasks/stats").json()
            assert stats["total"]["statuses"]["cancelled"] == 1
            assert stats["tasks"]["tests.apps.workers.sleep"]["statuses"]["cancelled"] == 1
