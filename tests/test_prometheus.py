"""`PrometheusMetrics`: the metrics of tracked tasks, in one process and across
a real ``uvicorn --workers 2`` in prometheus-client's multiprocess mode."""

from __future__ import annotations

import re
import time
from pathlib import Path

import anyio
import httpx2
import pytest
import stamina
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from fastapi_bgplus import BackgroundTasks, TaskTracker, task
from fastapi_bgplus.prometheus import PrometheusMetrics
from tests._subprocess import run_python
from tests.asgi import request

from ._servers import uvicorn


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


async def send_receipt(order: str) -> None:
    pass


@task(attempts=3, retry_on=ConnectionError)
async def charge_card(order: str) -> None:
    raise ConnectionError("down")


@pytest.mark.anyio
async def test_the_metrics_count_ends_durations_retries_and_what_is_in_flight() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    tracker = TaskTracker(observers=[metrics])
    app = FastAPI(lifespan=tracker.lifespan)
    gate = anyio.Event()
    seen: list[float] = []

    async def held(order: str) -> None:
        seen.append(sample(generate_latest(registry).decode(), "bgplus_tasks_in_flight"))
        await gate.wait()

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_receipt, "order-1234")
        tasks.add_task(charge_card, "order-1234")
        tasks.add_task(held, "order-1234")
        return {}

    with stamina.set_testing(True, attempts=3):
        async with tracker.lifespan(app) as state, anyio.create_task_group() as group:
            group.start_soon(request, app, state, "/")
            await anyio.wait_all_tasks_blocked()
            gate.set()
    text = generate_latest(registry).decode()
    name = f"{__name__}.send_receipt"
    assert sample(text, "bgplus_tasks_total", task=name, status="done") == 1
    assert sample(text, "bgplus_tasks_total", task=f"{__name__}.charge_card", status="failed") == 1
    assert sample(text, "bgplus_task_retries_total", task=f"{__name__}.charge_card") == 2
    assert sample(text, "bgplus_task_duration_seconds_count", task=name) == 1
    assert seen == [1.0]  # the held task itself, running
    assert sample(text, "bgplus_tasks_in_flight") == 0
    assert "order-1234" not in text  # never an argument


def test_import_fastapi_bgplus_does_not_import_prometheus_client() -> None:
    script = """
        import sys
        import fastapi_bgplus
        assert "prometheus_client" not in sys.modules
        print("ok")
    """
    assert run_python(script) == "ok"


@pytest.mark.slow
def test_two_uvicorn_workers_are_counted_together_in_multiprocess_mode(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    sent = 40
    with uvicorn(tmp_path, "--workers", "2", app="tests.apps.metrics:app", env=env) as server:
        for index in range(sent):
            httpx2.post(
                f"{server.url}/queue", params={"order": f"o{index}", "fail": index % 4 == 0}
            ).raise_for_status()
        deadline = time.monotonic() + 10
        while True:
            text = httpx2.get(f"{server.url}/metrics/").text
            done = sample(text, "bgplus_tasks_total", status="done")
            if done == sent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        server.terminate()
    assert done == sent
    assert sample(text, "bgplus_tasks_total", status="failed") == sent / 4
    assert sample(text, "bgplus_tasks_in_flight") == 0
    assert len(list(metrics_dir.glob("counter_*.db"))) == 2  # both workers wrote
    assert "o1" not in text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)  # taskiq runs on asyncio
async def test_tasks_that_never_start_or_leave_for_taskiq_leave_nothing_in_flight() -> None:
    from taskiq import InMemoryBroker

    registry = CollectorRegistry()
    tracker = TaskTracker(observers=[PrometheusMetrics(registry=registry)])
    app = FastAPI(lifespan=tracker.lifespan)
    broker = InMemoryBroker(await_inplace=True)

    @broker.task
    async def remote() -> None:
        pass

    @app.post("/fails")
    async def fails(tasks: BackgroundTasks) -> None:
        tasks.add_task(send_receipt, "order-1")
        raise RuntimeError("the endpoint failed")

    @app.post("/remote")
    async def to_taskiq(tasks: BackgroundTasks) -> dict[str, str]:
        return {"id": tasks.add_task(remote).task_id}

    await broker.startup()
    async with tracker.lifespan(app) as state:
        with pytest.raises(RuntimeError, match="the endpoint failed"):
            await request(app, state, "/fails")
        await request(app, state, "/remote")
    await broker.shutdown()
    text = generate_latest(registry).decode()
    cancelled = {"task": f"{__name__}.send_receipt", "status": "cancelled"}
    assert sample(text, "bgplus_tasks_total", **cancelled) == 1
    assert sample(text, "bgplus_task_duration_seconds_count") == 0  # neither ran here
    assert sample(text, "bgplus_tasks_in_flight") == 0
