"""Prometheus metrics of background tasks: an observer for the ``prometheus`` extra.

::

    from fastapi_bgplus import TaskTracker
    from fastapi_bgplus.prometheus import PrometheusMetrics

    tracker = TaskTracker(observers=[PrometheusMetrics()])

It counts in prometheus-client's metrics, so the app's usual ``/metrics``
(``app.mount("/metrics", prometheus_client.make_asgi_app())``) shows them. With
several worker processes (``uvicorn --workers N``, gunicorn), set
``PROMETHEUS_MULTIPROC_DIR`` and serve a registry with prometheus-client's
``MultiProcessCollector``, as its docs show: the in-flight gauge sums the live
processes (``livesum``).

Label values are task names (``module.qualname``, as `TaskHandle.name`): as
many as the app has task functions. A lambda is named ``module.<lambda>``, a
partial by the function it wraps, a nested function by its qualname
(``outer.<locals>.inner``), so the count stays bounded. Never an argument.

Importing this module imports prometheus-client; ``import fastapi_bgplus``
never does.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._handle import TaskHandle
from ._report import Cancellable, TaskObserver

__all__ = ["PrometheusMetrics"]


class PrometheusMetrics(TaskObserver):
    """A `TaskObserver` that counts every tracked task in Prometheus metrics.

    - ``{namespace}_tasks_total{task, status}``: ended tasks, by status
      (``done``, ``failed``, ``cancelled``);
    - ``{namespace}_task_duration_seconds{task}``: how long ended tasks ran
      (a histogram; tasks that never started are not in it);
    - ``{namespace}_tasks_in_flight{task}``: queued or running now (a gauge;
      a task waiting for its turn counts);
    - ``{namespace}_task_retries_total{task}``: retries of ``@task(attempts=...)``.

    Parameters:
        registry: Where the metrics are registered; prometheus-client's
            default registry if `None`.
        namespace: The prefix of the metric names.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, namespace: str = "bgplus"
    ) -> None:
        registry = REGISTRY if registry is None else registry
        self.tasks = Counter(
            "tasks",
            "Background tasks ended, by status.",
            ["task", "status"],
            namespace=namespace,
            registry=registry,
        )
        self.duration = Histogram(
            "task_duration_seconds",
            "How long background tasks ran.",
            ["task"],
            namespace=namespace,
            registry=registry,
        )
        self.in_flight = Gauge(
            "tasks_in_flight",
            "Background tasks queued or running.",
            ["task"],
            namespace=namespace,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.retries = Counter(
            "task_retries",
            "Retries of background tasks.",
            ["task"],
            namespace=namespace,
            registry=registry,
        )

    def task_queued(self, handle: TaskHandle, tasks: Cancellable) -> None:
        self.in_flight.labels(handle.name).inc()

    def task_retrying(self, handle: TaskHandle, error: BaseException, wait_s: float) -> None:
        self.retries.labels(handle.name).inc()

    def task_ended(self, handle: TaskHandle) -> None:
        self.in_flight.labels(handle.name).dec()
        self.tasks.labels(handle.name, handle.status.value).inc()
        if handle.duration_s is not None:
            self.duration.labels(handle.name).observe(handle.duration_s)

    def task_handed_off(self, handle: TaskHandle) -> None:
        # It runs in a taskiq worker now, whose own metrics count it.
        self.in_flight.labels(handle.name).dec()
