"""The taskiq side of examples/taskiq_app.py: the broker, a task, and the
middleware that reports its status.

Run a worker with (Redis on localhost, or set ``REDIS_URL``)::

    taskiq worker examples.taskiq_worker:broker

The web app imports this module too: it sends `send_welcome_email` through
`add_task`, and the worker runs it. `TrackingMiddleware` writes each task's
status where both read it, and sends the package's signals in the worker (the
receiver below logs each completed task there).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio

from fastapi_bgplus import RedisStore, signals
from fastapi_bgplus.taskiq import TrackingMiddleware
from fastapi_bgplus.taskiq_redis import ReclaimingRedisStreamBroker

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

logger = logging.getLogger("examples.taskiq_worker")

store = RedisStore(REDIS_URL)  # the task store: this worker writes, the web app reads
# taskiq-redis's RedisStreamBroker, reclaiming a dead worker's messages on a
# quiet queue too, and stopping on SIGTERM (see docs/taskiq.md).
broker = ReclaimingRedisStreamBroker(
    REDIS_URL,
    # A message is acknowledged once its task has run: a worker that dies
    # mid-task leaves it to another, after idle_timeout (ms) without an ack.
    idle_timeout=60_000,
).with_middlewares(TrackingMiddleware(store))


@broker.task
async def send_welcome_email(address: str) -> None:
    """Stands in for an e-mail API call."""
    await anyio.sleep(0.5)


@signals.task_completed.connect_via(broker)
def log_completed(sender: Any, *, task_id: str, duration_s: float, **kwargs: Any) -> None:
    # Fires in the worker: the broker is the sender there.
    logger.info("task %s done in %.2f s", task_id, duration_s)
