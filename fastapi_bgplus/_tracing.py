"""OpenTelemetry: one span per task, named and shaped as FastAPI's own.

FastAPI 0.165 runs each of its background tasks in a ``fastapi.background_task``
span, a child of the request's span, with ``code.function.name`` and, when the
task raises, ``error.type`` and an ERROR status (never the exception's message).
`SpanObserver` gives each of our tasks a span of that shape, plus the task's
id, and marks a cancelled or cut-off task; it makes the span current while the
task runs, so that the spans the task opens nest under it (in the worker thread
of a ``def`` task too: anyio copies the context there).

OpenTelemetry is optional. This module imports it only when asked for spans or
trace context; for a request's collection, only once a span records, which
cannot happen before something else has imported it. `import fastapi_bgplus`
never does.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextvars import Token
from typing import TYPE_CHECKING

from ._handle import TaskHandle, TaskStatus
from ._report import TaskObserver

if TYPE_CHECKING:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer


__all__ = [
    "ATTEMPT",
    "CANCELLED",
    "RETRY_EVENT",
    "SPAN_NAME",
    "TASK_ID",
    "SpanObserver",
    "current_observer",
    "extract_context",
    "inject_context",
    "span_observer",
]

SPAN_NAME = "fastapi.background_task"
"""FastAPI's name for the span of one of its own background tasks."""
FUNCTION = "code.function.name"
TASK_ID = "fastapi_bgplus.task.id"
CANCELLED = "fastapi_bgplus.task.cancelled"
"""``True`` on the span of a task that ended cancelled: cut off while running
(at shutdown, or its request's run was cancelled), or abandoned before it
started (its request failed; a span of no duration then)."""
RETRY_EVENT = "fastapi_bgplus.task.retry"
"""An event on the task's span when another attempt of it begins."""
ATTEMPT = "fastapi_bgplus.task.attempt"

_tracer: Tracer | None = None
_task_key = ""  # marks the context a task's span was attached in (see task_ended)


def current_observer() -> SpanObserver | None:
    """A `SpanObserver` for a new collection if a span records in the current
    context, else `None`: one check per collection, none per task."""
    # No span can record before OpenTelemetry is imported; looking in
    # sys.modules first keeps it unimported, and the check free, without it.
    loaded = sys.modules.get("opentelemetry.trace")
    if loaded is None or not loaded.get_current_span().is_recording():
        return None
    return span_observer()


def span_observer() -> SpanObserver:
    """A `SpanObserver`, whether or not a span records now: for a runner outside
    the request (a taskiq worker), where each task's span continues the trace
    current when it starts (attach `extract_context` of the message first).

    Raises `ModuleNotFoundError` if OpenTelemetry is not installed."""
    if _tracer is None:
        _load()
    return SpanObserver()


def _load() -> None:
    global _tracer, _task_key, otel_context, trace
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from . import __version__

    # The global provider, as OpenTelemetry's instrumentations use by default.
    _tracer = trace.get_tracer("fastapi_bgplus", __version__)
    _task_key = otel_context.create_key("fastapi_bgplus.task")


class SpanObserver(TaskObserver):
    """A `TaskObserver` that runs each task of one collection in a span of its own.

    Span: `SPAN_NAME`, a child of the span current when the task starts (the
    request's), with ``code.function.name`` (the task's `TaskHandle.name`) and
    `TASK_ID`. A failure sets ``error.type`` (the exception's class) and an
    ERROR status; a success leaves the status unset, as FastAPI does. A
    cancelled task gets `CANCELLED`; each retry, a `RETRY_EVENT` with `ATTEMPT`.
    Never the task's arguments, never an exception's message.
    """

    def __init__(self) -> None:
        self._open: dict[TaskHandle, tuple[Span, Token[Context]]] = {}

    def task_started(self, handle: TaskHandle) -> None:
        opened = self._open.get(handle)
        if opened is not None:
            # Another attempt of a retried task: the same span, an event more.
            opened[0].add_event(RETRY_EVENT, {ATTEMPT: handle.attempts})
            return
        span = _start(handle)
        # Attached here and detached in task_ended: the run loop calls both
        # from the task's own asyncio/trio task and context.
        context = otel_context.set_value(_task_key, handle, trace.set_span_in_context(span))
        self._open[handle] = (span, otel_context.attach(context))

    def task_ended(self, handle: TaskHandle) -> None:
        opened = self._open.pop(handle, None)
        if opened is None:
            # Abandoned before it started: a span all the same (of no
            # duration), so that no task of the request is missing from its trace.
            span = _start(handle)
        else:
            span, token = opened
            # Detached in the context it was attached in, even if the task
            # left contexts of its own attached there (they go with it); not
            # when reported from elsewhere (the drain's task, for a task that
            # swallowed its cancellation), where detaching would fail.
            if otel_context.get_value(_task_key) is handle:
                otel_context.detach(token)
        if handle.status is TaskStatus.FAILED:
            span.set_attribute("error.type", _error_type(handle.error))
            span.set_status(trace.StatusCode.ERROR)
        elif handle.status is TaskStatus.CANCELLED:
            span.set_attribute(CANCELLED, True)
        span.end()

    # Sent to a queue (`task_handed_off`): no span here; the worker's
    # continues the trace from the context the message carries.


def _start(handle: TaskHandle) -> Span:
    assert _tracer is not None
    return _tracer.start_span(
        SPAN_NAME, attributes={FUNCTION: handle.name, TASK_ID: handle.task_id}
    )


def _error_type(error: BaseException | None) -> str:
    # As FastAPI writes it: builtins by their bare name, others qualified.
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def inject_context() -> dict[str, str]:
    """The current trace context as text headers (W3C ``traceparent``, and
    ``tracestate`` and ``baggage`` when set, through OpenTelemetry's configured
    propagators), for a message's labels. Empty without OpenTelemetry or a span."""
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover  (tested in a subprocess)
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> Context | None:
    """The trace context that `inject_context` put in `carrier`, to start a span
    in (``tracer.start_span(name, context=...)``) or to attach; `None` without
    OpenTelemetry. Unknown keys are ignored."""
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover  (tested in a subprocess)
        return None
    return propagate.extract(carrier)
