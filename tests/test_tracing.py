"""OpenTelemetry: one span per task, inside the request's trace (issue 12).

Spans go to the global tracer provider, as FastAPI's own (by default) and
OpenTelemetry's instrumentations do. OpenTelemetry forbids replacing it, so the
`spans` fixture installs one provider for the whole session; its sampler records
only while a test holds the fixture, so that later tests' requests (FastAPI
traces every request once a provider is set) record nothing.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import fastapi
import httpx2
import pytest
import stamina
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from fastapi_bgplus import BackgroundTasks, TaskTracker, TrackedBackgroundTasks, task
from fastapi_bgplus._tracing import (
    current_observer,
    extract_context,
    inject_context,
)

from ._subprocess import run_python
from .apps.memory import Stubborn, request_tasks

pytestmark = pytest.mark.anyio

SPAN = "fastapi.background_task"
FUNCTION = "code.function.name"
TASK_ID = "fastapi_bgplus.task.id"
CANCELLED = "fastapi_bgplus.task.cancelled"

tracer = trace.get_tracer("tests")


class Switch(Sampler):
    """Records every span while on; drops every span while off."""

    on = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        decision = Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP
        return SamplingResult(decision, attributes)

    def get_description(self) -> str:
        return "Switch"


@pytest.fixture(scope="session")
def provider() -> tuple[Switch, InMemorySpanExporter]:
    switch = Switch()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=switch)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "a global tracer provider was already set"
    return switch, exporter


@pytest.fixture
def spans(provider: tuple[Switch, InMemorySpanExporter]) -> Iterator[InMemorySpanExporter]:
    """The spans this test finishes, recorded by the global tracer provider."""
    switch, exporter = provider
    exporter.clear()
    switch.on = True
    try:
        yield exporter
    finally:
        switch.on = False
        exporter.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: Any) -> int:
    return int(span.get_span_context().span_id)


def everything_said(span: ReadableSpan) -> str:
    """All the text a span carries: attributes, events, status."""
    events = [(event.name, dict(event.attributes or {})) for event in span.events]
    return repr((attributes(span), events, span.status.description))


class Boom(Exception):
    pass


async def noop() -> None:
    pass


def noop_sync() -> None:
    pass


async def opens_a_span() -> None:
    with tracer.start_as_current_span("inside async"):
        pass


def opens_a_span_sync() -> None:
    with tracer.start_as_current_span("inside sync"):
        pass


async def fails(secret: str) -> None:
    raise Boom(f"failed for {secret}")


def fails_builtin(secret: str) -> None:
    raise ValueError(f"failed for {secret}")


def request_collection() -> TrackedBackgroundTasks:
    return TrackedBackgroundTasks.for_request({"type": "http"})


async def test_each_task_runs_in_a_span_of_its_own_under_the_request_span(
    spans: InMemorySpanExporter,
) -> None:
    with tracer.start_as_current_span("request") as request:
        tasks = request_collection()
        handles = [tasks.add_task(noop), tasks.add_task(noop_sync)]
        await tasks()
        assert trace.get_current_span() is request  # the task spans were detached

    task_spans = named(spans, SPAN)
    assert [attributes(span) for span in task_spans] == [
        {FUNCTION: "tests.test_tracing.noop", TASK_ID: handles[0].task_id},
        {FUNCTION: "tests.test_tracing.noop_sync", TASK_ID: handles[1].task_id},
    ]
    assert [parent_id(span) for span in task_spans] == [span_id(request)] * 2
    assert {span.kind for span in task_spans} == {SpanKind.INTERNAL}
    assert {span.status.status_code for span in task_spans} == {StatusCode.UNSET}
    assert all(span.events == () for span in task_spans)


async def test_spans_a_task_opens_nest_under_its_span_sync_or_async(
    spans: InMemorySpanExporter,
) -> None:
    with tracer.start_as_current_span("request"):
        tasks = request_collection()
        tasks.add_task(opens_a_span)
        tasks.add_task(opens_a_span_sync)
        await tasks()

    first, second = named(spans, SPAN)
    (inside_async,) = named(spans, "inside async")
    (inside_sync,) = named(spans, "inside sync")
    assert parent_id(inside_async) == span_id(first)
    assert parent_id(inside_sync) == span_id(second)  # in the worker thread


async def test_a_task_that_leaves_a_span_current_does_not_leak_it(
    spans: InMemorySpanExporter,
) -> None:
    async def leaky() -> None:
        span = tracer.start_span("left current")
        otel_context.attach(trace.set_span_in_context(span))  # never detached
        span.end()

    with tracer.start_as_current_span("request") as request:
        tasks = request_collection()
        tasks.add_task(leaky)
        tasks.add_task(noop)
        await tasks()
        assert trace.get_current_span() is request

    _, second = named(spans, SPAN)
    assert parent_id(second) == span_id(request)


async def test_a_failed_task_has_error_type_and_status_and_no_message(
    spans: InMemorySpanExporter,
) -> None:
    with tracer.start_as_current_span("request") as request:
        tasks = request_collection()
        tasks.add_task(fails, "s3cr3t@example.com")
        tasks.add_task(fails_builtin, "s3cr3t@example.com")
        tasks.add_task(noop)
        await tasks()

    custom, builtin, after = named(spans, SPAN)
    assert attributes(custom)["error.type"] == "tests.test_tracing.Boom"
    assert attributes(builtin)["error.type"] == "ValueError"
    for span in (custom, builtin):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description is None
        assert span.events == ()  # no recorded exception
        assert "s3cr3t" not in everything_said(span)
        assert "failed for" not in everything_said(span)
    assert after.status.status_code is StatusCode.UNSET
    assert "error.type" not in attributes(after)
    assert {parent_id(span) for span in (custom, builtin, after)} == {span_id(request)}


async def test_a_task_cut_off_and_those_behind_it_are_marked_cancelled(
    spans: InMemorySpanExporter,
) -> None:
    running = anyio.Event()

    async def forever() -> None:
        running.set()
        await anyio.sleep_forever()

    with tracer.start_as_current_span("request") as request:
        tasks = request_collection()
        tasks.add_task(noop)
        tasks.add_task(forever)
        tasks.add_task(noop)
        async with anyio.create_task_group() as tg:
            tg.start_soon(tasks.run)
            await running.wait()
            tg.cancel_scope.cancel()
        assert trace.get_current_span() is request

    done, cut_off, never_started = named(spans, SPAN)
    assert CANCELLED not in attributes(done)
    for span in (cut_off, never_started):
        assert attributes(span)[CANCELLED] is True
        assert span.status.status_code is StatusCode.UNSET
        assert "error.type" not in attributes(span)
        assert parent_id(span) == span_id(request)


async def test_tasks_of_a_failed_request_get_a_cancelled_span_each(
    spans: InMemorySpanExporter,
) -> None:
    with tracer.start_as_current_span("request") as request:
        tasks = request_collection()
        queued = tasks.add_task(noop)
        await tasks.end_request(Boom("the endpoint failed"))
        late = tasks.add_task(noop)  # after the request: already cancelled

    task_spans = named(spans, SPAN)
    assert [attributes(span)[TASK_ID] for span in task_spans] == [
        queued.task_id,
        late.task_id,
    ]
    for span in task_spans:
        assert attributes(span)[CANCELLED] is True
        assert parent_id(span) == span_id(request)
        assert "the endpoint failed" not in everything_said(span)


async def test_a_task_that_swallows_its_cancellation_at_shutdown_is_still_ended(
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The drain reports it from its own task: the span ends there, and the
    # context attached in the request's task is left to that task.
    tracker = TaskTracker(drain_timeout=0, shutdown_grace=0)
    stubborn = Stubborn()

    async def request(state: Mapping[str, Any]) -> None:
        with tracer.start_as_current_span("request"):
            async with request_tasks(state) as tasks:
                tasks.add_task(stubborn)

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(None) as state:
            tg.start_soon(request, state)
            await stubborn.running.wait()
        (span,) = named(spans, SPAN)
        assert attributes(span)[CANCELLED] is True
        stubborn.release.set()
    assert not [record for record in caplog.records if record.name.startswith("opentelemetry")]


async def test_nothing_is_traced_without_a_recording_span(
    spans: InMemorySpanExporter, provider: tuple[Switch, InMemorySpanExporter]
) -> None:
    tasks = request_collection()  # no span at all
    tasks.add_task(opens_a_span)
    await tasks()
    assert named(spans, SPAN) == []
    assert [span.name for span in spans.get_finished_spans()] == ["inside async"]

    switch, _ = provider
    switch.on = False
    with tracer.start_as_current_span("request") as request:  # not recording
        assert not request.is_recording()
        assert current_observer() is None


async def test_each_retry_is_an_event_on_the_one_span(
    spans: InMemorySpanExporter, no_receivers: None
) -> None:
    @task(attempts=3, retry_on=Boom)
    async def flaky() -> None:
        raise Boom

    with stamina.set_testing(True, attempts=3), tracer.start_as_current_span("request"):
        tasks = TrackedBackgroundTasks.for_request({"type": "http"})
        handle = tasks.add_task(flaky)
        await tasks.run()
    assert handle.attempts == 3

    (span,) = named(spans, SPAN)
    assert [(event.name, dict(event.attributes or {})) for event in span.events] == [
        ("fastapi_bgplus.task.retry", {"fastapi_bgplus.task.attempt": 2}),
        ("fastapi_bgplus.task.retry", {"fastapi_bgplus.task.attempt": 3}),
    ]
    assert span.status.status_code is StatusCode.ERROR


async def test_the_trace_context_travels_in_a_dict(spans: InMemorySpanExporter) -> None:
    assert inject_context() == {}  # no span: nothing to carry
    with tracer.start_as_current_span("request") as request:
        carrier = inject_context()
    trace_id = f"{request.get_span_context().trace_id:032x}"
    assert carrier["traceparent"].split("-")[1] == trace_id

    received = extract_context({**carrier, "unrelated": "label"})
    assert received is not None
    with tracer.start_as_current_span("in the worker", context=received):
        pass
    (worker,) = named(spans, "in the worker")
    assert worker.context.trace_id == request.get_span_context().trace_id
    assert parent_id(worker) == span_id(request)


# Against FastAPI's own spans, under its native telemetry (on by default in
# FastAPI 0.165 once a tracer provider is set).

NATIVE_TELEMETRY = pytest.mark.skipif(
    importlib.util.find_spec("fastapi.telemetry") is None,
    reason="FastAPI < 0.142 has no native OpenTelemetry support (fastapi.telemetry),"
    " so no spans of its own to compare with",
)


async def fastapi_endpoint(tasks: fastapi.BackgroundTasks) -> None:
    tasks.add_task(opens_a_span)
    tasks.add_task(opens_a_span_sync)


async def bgplus_endpoint(tasks: BackgroundTasks) -> None:
    tasks.add_task(opens_a_span)
    tasks.add_task(opens_a_span_sync)


async def fastapi_failing(tasks: fastapi.BackgroundTasks) -> None:
    tasks.add_task(fails, "s3cr3t")


async def bgplus_failing(tasks: BackgroundTasks) -> None:
    tasks.add_task(fails, "s3cr3t")


def traced_app() -> fastapi.FastAPI:
    app = fastapi.FastAPI()
    app.post("/fastapi")(fastapi_endpoint)
    app.post("/bgplus")(bgplus_endpoint)
    app.post("/fastapi-failing")(fastapi_failing)
    app.post("/bgplus-failing")(bgplus_failing)
    return app


async def post(app: fastapi.FastAPI, path: str) -> None:
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.post(path)


def shape(exporter: InMemorySpanExporter, path: str) -> list[tuple[Any, ...]]:
    """The background-task spans of the request to `path`, and what is inside
    them: (name, parent's name, function, attribute keys, status, error.type)."""
    finished = exporter.get_finished_spans()
    (server,) = [span for span in finished if span.name == f"POST {path}"]
    by_id = {span.context.span_id: span for span in finished}
    rows = []
    for span in finished:
        if span.context.trace_id != server.context.trace_id or span.kind is SpanKind.SERVER:
            continue
        parent = by_id[parent_id(span)]
        if span.name != SPAN and parent.name != SPAN:
            continue  # FastAPI's dependencies, endpoint and serialization spans
        said = attributes(span)
        rows.append(
            (
                span.name,
                "the request" if parent is server else parent.name,
                said.pop(FUNCTION, None),
                sorted(said.keys() - {TASK_ID}),
                span.status.status_code,
                said.get("error.type"),
            )
        )
    return rows


@NATIVE_TELEMETRY
async def test_spans_match_fastapi_own_background_task_spans(
    spans: InMemorySpanExporter,
) -> None:
    app = traced_app()
    await post(app, "/fastapi")
    await post(app, "/bgplus")
    expected: list[tuple[Any, ...]] = [
        ("inside async", SPAN, None, [], StatusCode.UNSET, None),
        (SPAN, "the request", "tests.test_tracing.opens_a_span", [], StatusCode.UNSET, None),
        ("inside sync", SPAN, None, [], StatusCode.UNSET, None),
        (SPAN, "the request", "tests.test_tracing.opens_a_span_sync", [], StatusCode.UNSET, None),
    ]
    assert shape(spans, "/fastapi") == expected
    assert shape(spans, "/bgplus") == expected
    assert all(TASK_ID in attributes(span) for span in named(spans, SPAN)[2:])


@NATIVE_TELEMETRY
async def test_failed_spans_match_fastapi_own(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)  # both log the failure; not the point here
    app = traced_app()
    await post(app, "/fastapi-failing")
    await post(app, "/bgplus-failing")
    failure = "tests.test_tracing.Boom"
    expected = [
        (SPAN, "the request", "tests.test_tracing.fails", ["error.type"], StatusCode.ERROR, failure)
    ]
    assert shape(spans, "/fastapi-failing") == expected
    assert shape(spans, "/bgplus-failing") == expected


@pytest.mark.skipif(
    importlib.util.find_spec("fastapi.telemetry") is None,
    reason="the README snippet traces under FastAPI's native telemetry (FastAPI >= 0.142):"
    " before it, without an instrumentation, no request span records, so tasks get none",
)
def test_the_guide_s_snippet_runs_and_prints_the_task_span() -> None:
    guide = (Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    section = guide.split("\n## Tracing (OpenTelemetry)\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    output = run_python(code)
    last = output.splitlines()[-1]
    assert last.startswith(
        "fastapi.background_task {'code.function.name': '__main__.send_welcome_email',"
        " 'fastapi_bgplus.task.id': '"
    ), output
    assert "ada@example.com" not in last
