"""An app for `tests/test_prometheus.py`: uvicorn serves it with several
workers, prometheus-client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``).

``POST /queue`` queues one task that succeeds and, with ``fail=true``, one that
raises; ``GET /metrics`` serves every worker's metrics.
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess

from fastapi_bgplus import BackgroundTasks, TaskTracker
from fastapi_bgplus.prometheus import PrometheusMetrics

tracker = TaskTracker(observers=[PrometheusMetrics()])
app = FastAPI(lifespan=tracker.lifespan)

registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
app.mount("/metrics", make_asgi_app(registry=registry))


async def send_receipt(order: str) -> None:
    pass


async def charge_card(order: str) -> None:
    raise ConnectionError("the card processor is down")


@app.get("/health")
async def health() -> str:
    return "ok"


@app.post("/queue")
async def queue(order: str, tasks: BackgroundTasks, fail: bool = False) -> dict[str, str]:
    tasks.add_task(send_receipt, order)
    if fail:
        tasks.add_task(charge_card, order)
    return {"order": order}
