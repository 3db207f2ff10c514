"""taskiq integration: the same `add_task` call sites, a real distributed queue.

``tasks.add_task(send_email, address)``, where `send_email` is a taskiq task
(decorated with ``@broker.task``), sends it to its broker at the point an
in-process task would run: after the response, only if the request
succeeded. The handle's `task_id` is the taskiq message's id.

In the worker, `TrackingMiddleware` writes each task's status to a task store
and sends the package's blinker signals there, with the broker as sender.

Importing this module imports taskiq; ``import fastapi_bgplus`` never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import anyio
from taskiq import AsyncTaskiqDecoratedTask, TaskiqMessage, TaskiqMiddleware, TaskiqResult

from ._backend import current_library
from ._handle import TaskHandle
from ._report import Reporter
from ._store import FINISHED, TASKIQ_OWNER
from ._tracker import DEFAULT_HISTORY_TTL

if TYPE_CHECKING:
    from starlette.background import BackgroundTask

    from ._options import TaskFunction
    from ._store import Record, TaskStore

__all__ = ["POLL_INTERVAL", "QUEUED", "TrackingMiddleware"]

logger = logging.getLogger("fastapi_bgplus")

_TRIO = (
    "taskiq tasks cannot be sent from trio: taskiq's brokers run on asyncio;"
    " serve the app on asyncio (uvicorn, or hypercorn's default worker class)"
    " or call the task in-process"
)


POLL_INTERVAL = 0.5
"""Seconds between two reads of the task store by `TaskHandle.wait()` for a
task handed to taskiq."""

QUEUED = "taskiq-queued"
"""The lease of tasks waiting in a queue: renewed by every process whose broker
has a `TrackingMiddleware` (web apps and workers), so a waiting task reads
``lost`` only once none of them has run for a lease's length."""


def _on_trio() -> bool:
    return current_library() == "trio"  # None in a worker thread (a `def` endpoint)


def runner_for(func: Any, options: TaskFunction[Any, Any] | None = None) -> _Sender | None:
    """The runner of a taskiq task, or `None` for anything else (called by
    `add_task` once taskiq is imported). Raises `RuntimeError` under trio.

    The task's `@task` options travel as taskiq labels: ``timeout`` as
    taskiq's ``timeout`` label (its receiver enforces it), ``attempts`` as
    ``retry_on_error`` and ``max_retries``, which taskiq's
    `SimpleRetryMiddleware` (or `SmartRetryMiddleware`) on the broker reads.
    ``retry_on`` cannot travel in a message (labels are strings): give the
    worker's own ``@broker.task(types_of_exceptions=...)``. ``concurrency``
    has no per-task counterpart in taskiq (``--max-async-tasks`` bounds a
    worker)."""
    if not isinstance(func, AsyncTaskiqDecoratedTask):
        return None
    if _on_trio():
        raise RuntimeError(f"add_task({func.task_name}): {_TRIO}")
    labels: dict[str, Any] = {}
    if options is not None:
        if options.timeout is not None:
            labels["timeout"] = options.timeout
        if options.attempts > 1:
            labels.update(retry_on_error=True, max_retries=options.attempts)
    return _Sender(func, labels)


class _Sender:
    """Runs a taskiq task by sending it to its broker: a `TaskRunner`."""

    __slots__ = ("func", "labels", "name")

    def __init__(self, func: AsyncTaskiqDecoratedTask[Any, Any], labels: dict[str, Any]) -> None:
        self.func = func
        self.labels = labels
        self.name = func.task_name  # what the worker names it as well

    async def __call__(self, report: Reporter, handle: TaskHandle, task: BackgroundTask) -> None:
        func = self.func
        if _on_trio():  # queued from a worker thread, run on trio
            await report.failed(handle, func, RuntimeError(f"{func.task_name}: {_TRIO}"))
            return
        kicker = func.kicker().with_task_id(handle.task_id).with_labels(**self.labels)
        try:
            await kicker.kiq(*task.args, **task.kwargs)
        except Exception as exc:  # the broker is down, an argument cannot be serialised...
            await report.failed(handle, func, exc)
            for middleware in func.broker.middlewares:
                if isinstance(middleware, TrackingMiddleware):
                    # Its `pre_send` wrote the record `pending`.
                    await middleware.write(handle)
            return
        report.handed_off(handle, functools.partial(_wait_in_store, func, handle.task_id))


async def _wait_in_store(func: AsyncTaskiqDecoratedTask[Any, Any], task_id: str) -> None:
    """`TaskHandle.wait()` of a task sent to taskiq: poll the store that the
    broker's `TrackingMiddleware` writes, until the task has ended."""
    tracking = [m for m in func.broker.middlewares if isinstance(m, TrackingMiddleware)]
    if not tracking:
        raise RuntimeError(
            f"Background task {task_id} ({func.task_name}) was handed to taskiq, and its"
            f" broker has no TrackingMiddleware, so nothing records its end; add"
            f" broker.with_middlewares(TrackingMiddleware(store)) to wait for it, or"
            f" use taskiq's own result backend"
        )
    store = tracking[0].store
    while True:
        record = await store.get(task_id) or {}  # none: expired, or the store lost it
        if record.get("status") in FINISHED:
            return
        owner = record.get("owner")
        if isinstance(owner, str) and not await store.lease_alive(owner):
            return  # lost: its worker died without reporting an end
        await anyio.sleep(POLL_INTERVAL)


class TrackingMiddleware(TaskiqMiddleware):
    """A taskiq middleware that writes each task's status to a task store and
    sends the package's signals in the worker.

    Add it to the broker, which the web app and the worker share:
    ``broker = RedisStreamBroker(url).with_middlewares(TrackingMiddleware(store))``.

    - When a task is sent (`kiq`, or `add_task` after the response), it
      writes the task's ``pending`` record, before the message leaves, and
      puts the request's trace context (W3C ``traceparent``) in the message's
      labels if OpenTelemetry is installed.
    - In the worker, it writes ``running``, then ``done`` or ``failed`` (with
      the error's class name), never arguments or messages, and sends
      `task_started`, `task_completed` and `task_failed` with the broker as
      sender. A task delivered again (its worker died mid-run) counts one
      more attempt.
    - Each process holds a lease in the store, renewed every third of
      `lease_ttl` while the broker runs: once it lapses, the tasks it was
      running read ``lost``. Tasks waiting in the queue belong to a lease all
      these processes renew (`QUEUED`): they read ``pending`` while any of
      them runs.

    A store that fails is logged at WARNING (at most once per `lease_ttl`) and
    never fails the task.

    Parameters:
        store: The `TaskStore` the web app's `TaskTracker` reads.
        lease_ttl: Seconds this process's lease lasts unless renewed.
        history_ttl: Seconds finished records stay in the store.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        lease_ttl: float = 30.0,
        history_ttl: float | None = DEFAULT_HISTORY_TTL,
    ) -> None:
        super().__init__()
        self.store = store
        self.lease_ttl = lease_ttl
        self.history_ttl = history_ttl
        self.owner = TASKIQ_OWNER + os.urandom(16).hex()
        self._running: dict[str, TaskHandle] = {}
        self._created: dict[str, str] = {}  # when it was sent, by task id (from the store)
        self._contexts: dict[str, Any] = {}  # OpenTelemetry context tokens, by task id
        self._renewer: asyncio.Task[None] | None = None
        self._warned_at = -float("inf")

    @property
    def reporter(self) -> Reporter:
        """Reports the worker's transitions, with the broker as signal sender."""
        return Reporter(self.broker)

    # Lease

    async def startup(self) -> None:
        # A new lease per process: the worker's processes may be forked
        # from one that built this middleware.
        self.owner = TASKIQ_OWNER + os.urandom(16).hex()
        await self._renew()
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def shutdown(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            await self._renew()

    async def _renew(self) -> None:
        try:
            await self.store.renew_lease(self.owner, self.lease_ttl)
            await self.store.renew_lease(QUEUED, self.lease_ttl)
        except Exception as exc:
            self._store_failed(exc)

    # Records

    async def write(self, handle: TaskHandle, owner: str | None = None) -> None:
        """Write `handle`'s record to the store, as this process's unless
        `owner` is given; a failure is logged, not raised."""
        record: Record = {**handle.to_dict(), "owner": owner or self.owner}
        created_at = self._created.get(handle.task_id)
        if created_at is not None:
            record["created_at"] = created_at
        try:
            await self.store.put([record], history_ttl=self.history_ttl)
        except Exception as exc:
            self._store_failed(exc)

    def _store_failed(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= self.lease_ttl:
            self._warned_at = now
            logger.warning(
                "The task store failed (%s); task status is not written until it is back",
                type(error).__name__,
            )

    def _handle(self, message: TaskiqMessage) -> TaskHandle:
        return TaskHandle(message.task_name, message.task_id)

    # Sending (in the web app, or wherever `kiq` is called)

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        _inject_trace_context(message.labels)
        # Before the message leaves, so the worker's `running` lands after it.
        # Owned by the queue, not by this process: a web process that stops
        # does not make the tasks it sent read `lost` while they wait.
        await self.write(self._handle(message), QUEUED)
        return message

    # Running (in the worker)

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        token = _attach_trace_context(message.labels)
        if token is not None:
            self._contexts[message.task_id] = token
        handle = self._handle(message)
        try:
            earlier = await self.store.get(message.task_id)
        except Exception as exc:
            self._store_failed(exc)
            earlier = None
        if earlier is not None:
            self._created[message.task_id] = earlier["created_at"]
            # Delivered again (its worker died): one more attempt.
            handle.attempts = int(earlier.get("attempts") or 0)
        self._running[message.task_id] = handle
        await self.reporter.started(handle, self._func(message))
        await self.write(handle)
        return message

    async def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        handle = self._running.pop(message.task_id, None)
        if handle is None:  # it failed before `pre_execute` (another middleware)
            return
        await self.reporter.failed(handle, self._func(message), exception)
        await self.write(handle)
        self._created.pop(message.task_id, None)

    async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        _detach_trace_context(self._contexts.pop(message.task_id, None))
        handle = self._running.pop(message.task_id, None)
        if handle is None:  # failed: `on_error` reported it
            return
        await self.reporter.completed(handle, self._func(message))
        await self.write(handle)
        self._created.pop(message.task_id, None)

    def _func(self, message: TaskiqMessage) -> Any:
        return self.broker.find_task(message.task_name)


# Trace context: a few lines, and only if OpenTelemetry is installed.


def _inject_trace_context(labels: dict[str, Any]) -> None:
    try:
        from opentelemetry.propagate import inject
    except ImportError:  # pragma: no cover  (opentelemetry is in the dev extra)
        return
    inject(labels)


def _attach_trace_context(labels: dict[str, Any]) -> object | None:
    if "traceparent" not in labels:
        return None
    from opentelemetry import context
    from opentelemetry.propagate import extract

    return context.attach(extract(labels))


def _detach_trace_context(token: Any) -> None:
    if token is not None:
        from opentelemetry import context

        context.detach(token)
