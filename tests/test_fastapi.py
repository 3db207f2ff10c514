"""The FastAPI integration: the import swap, points 1-8 of the spec (issue 2).

Every request goes through both FastAPI's `TestClient` and httpx's
`ASGITransport`, on asyncio and on trio.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal, get_args

import anyio
import anyio.lowlevel
import httpx2
import pytest
from fastapi import BackgroundTasks as FastAPIBackgroundTasks
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_bgplus import (
    BackgroundTasks,
    TaskHandle,
    TaskTracker,
    TrackedBackgroundTasks,
    get_background_tasks,
)

from .conftest import FASTAPI, Call, Sent

# Dependencies; module-level, so that FastAPI resolves these annotations.


# A dependency returns the collection in a list: FastAPI < 0.128.2 refuses
# `Depends` on a parameter typed as a BackgroundTasks subclass (see README).
def tasks_of_a_dependency(tasks: BackgroundTasks) -> list[TrackedBackgroundTasks]:
    return [tasks]


async def tasks_of_a_nested_dependency(
    tasks: Annotated[list[TrackedBackgroundTasks], Depends(tasks_of_a_dependency)],
    again: BackgroundTasks,
) -> tuple[TrackedBackgroundTasks, TrackedBackgroundTasks]:
    return tasks[0], again


FromDependency = Annotated[list[TrackedBackgroundTasks], Depends(tasks_of_a_dependency)]
FromNested = Annotated[
    tuple[TrackedBackgroundTasks, TrackedBackgroundTasks], Depends(tasks_of_a_nested_dependency)
]
Explicit = Annotated[TrackedBackgroundTasks, Depends(get_background_tasks)]


class FakeSession:
    """Stands for a DB session: open between the yield dependency's enter and exit."""

    def __init__(self) -> None:
        self.open = True


async def get_db(request: Request) -> AsyncIterator[FakeSession]:
    session = FakeSession()
    request.app.state.sessions.append(session)
    try:
        yield session
    finally:
        session.open = False


def get_db_sync(request: Request) -> Iterator[FakeSession]:
    session = FakeSession()
    request.app.state.sessions.append(session)
    try:
        yield session
    finally:
        session.open = False


Db = Annotated[FakeSession, Depends(get_db)]
DbSync = Annotated[FakeSession, Depends(get_db_sync)]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
trace: contextvars.ContextVar[str] = contextvars.ContextVar("trace")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = request_id.set("req-42")
        try:
            await self.app(scope, receive, send)
        finally:
            request_id.reset(token)


async def set_tenant() -> None:
    tenant.set("acme")


async def set_tenant_and_yield() -> AsyncIterator[None]:
    tenant.set("acme")
    yield


# Tasks


def record(log: list[str], entry: str) -> None:
    log.append(entry)


async def record_async(log: list[str], entry: str) -> None:
    await anyio.lowlevel.checkpoint()
    log.append(entry)


def check_open(log: list[str], session: FakeSession) -> None:
    log.append(f"sync task: session open={session.open}")


async def check_open_async(log: list[str], session: FakeSession) -> None:
    await anyio.lowlevel.checkpoint()
    log.append(f"async task: session open={session.open}")


def read_context(log: list[str]) -> None:
    log.append(f"sync: {request_id.get('-')} {tenant.get('-')} {trace.get('-')}")


async def read_context_async(log: list[str]) -> None:
    log.append(f"async: {request_id.get('-')} {tenant.get('-')} {trace.get('-')}")


def test_endpoint_and_dependencies_get_the_same_collection(call: Call) -> None:
    app = FastAPI()
    seen: list[list[TrackedBackgroundTasks]] = []

    @app.post("/")
    async def endpoint(
        tasks: BackgroundTasks,
        from_dependency: FromDependency,
        nested: FromNested,
    ) -> dict[str, str]:
        seen.append([tasks, *from_dependency, *nested])
        return {}

    assert call(app, "POST", "/").status_code == 200
    assert call(app, "POST", "/").status_code == 200
    for collections in seen:
        assert all(type(tasks) is TrackedBackgroundTasks for tasks in collections)
        assert all(tasks is collections[0] for tasks in collections)
    assert seen[0][0] is not seen[1][0]


def test_tasks_have_finished_when_the_request_returns(call: Call) -> None:
    app = FastAPI()
    log: list[str] = []
    handles: list[TaskHandle] = []

    @app.post("/users", status_code=201)
    async def create_user(tasks: BackgroundTasks) -> dict[str, str]:
        handles.append(tasks.add_task(record_async, log, "welcome e-mail"))
        handles.append(tasks.add_task(record, log, "audit"))
        assert log == []
        return {"task_id": handles[0].task_id}

    response = call(app, "POST", "/users")
    assert response.status_code == 201
    assert response.json() == {"task_id": handles[0].task_id}
    assert log == ["welcome e-mail", "audit"]
    assert [handle.status for handle in handles] == ["done", "done"]


@pytest.mark.skipif(
    FASTAPI < (0, 128, 2),
    reason="FastAPI < 0.128.2 refuses Depends on a parameter typed as a BackgroundTasks subclass",
)
def test_explicit_annotated_dependency_works(call: Call) -> None:
    app = FastAPI()
    log: list[str] = []

    @app.post("/")
    async def endpoint(tasks: Explicit, again: BackgroundTasks) -> None:
        assert isinstance(tasks, TrackedBackgroundTasks)
        assert tasks is again
        tasks.add_task(record, log, "explicit")

    assert call(app, "POST", "/").status_code == 200
    assert log == ["explicit"]


def test_the_alias_is_accepted_by_every_fastapi_the_matrix_runs(call: Call) -> None:
    """FastAPI before 0.128.2 asserts, when the route is declared, that a
    parameter with `Depends` is not typed as a BackgroundTasks subclass; the
    alias's runtime type is not one, and still builds a collection when called."""
    from starlette.background import BackgroundTask
    from starlette.background import BackgroundTasks as StarletteBackgroundTasks

    origin, *metadata = get_args(BackgroundTasks)
    assert not issubclass(origin, StarletteBackgroundTasks)
    assert [type(item) for item in metadata] == [type(Depends(get_background_tasks))]
    built = BackgroundTasks(tasks=[BackgroundTask(record, [], "by hand")])
    assert type(built) is TrackedBackgroundTasks
    assert len(built.handles) == 1
    assert type(BackgroundTasks()) is TrackedBackgroundTasks

    app = FastAPI()

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, str]:
        return {"type": type(tasks).__name__}

    assert call(app, "POST", "/").json() == {"type": "TrackedBackgroundTasks"}


def test_a_sync_endpoint_works(call: Call) -> None:
    app = FastAPI()
    log: list[str] = []
    handles: list[TaskHandle] = []

    @app.post("/")
    def endpoint(tasks: BackgroundTasks, from_dependency: FromDependency) -> dict[str, bool]:
        handles.append(tasks.add_task(record, log, "from a def endpoint"))
        handles.append(tasks.add_task(record_async, log, "async task"))
        return {"same": tasks is from_dependency[0]}

    assert call(app, "POST", "/").json() == {"same": True}
    assert log == ["from a def endpoint", "async task"]
    assert [handle.status for handle in handles] == ["done", "done"]


@pytest.mark.skipif(
    FASTAPI < (0, 118),
    reason="FastAPI < 0.118 gives a provider no hook after the response: a response's"
    " own background drops the injected tasks (README)",
)
def test_a_returned_response_background_runs_first_then_the_injected_tasks(
    call: Call, sent: list[Sent]
) -> None:
    app = FastAPI()
    log: list[str] = []
    handles: list[TaskHandle] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> Response:
        handles.append(tasks.add_task(record_async, log, "injected 1"))
        handles.append(tasks.add_task(record, log, "injected 2"))
        own = BackgroundTasks()
        handles.append(own.add_task(record, log, "response's own"))
        return JSONResponse({"ok": True}, background=own)

    assert call(app, "POST", "/").json() == {"ok": True}
    assert log == ["response's own", "injected 1", "injected 2"]
    assert [handle.status for handle in handles] == ["done", "done", "done"]
    assert [event.signal for event in sent].count("task_abandoned") == 0


@pytest.mark.skipif(
    FASTAPI < (0, 118),
    reason="FastAPI < 0.118 gives a provider no hook after the response: a response's"
    " own background drops the injected tasks (README)",
)
def test_a_plain_starlette_response_background_is_kept_too(call: Call) -> None:
    from starlette.background import BackgroundTask

    app = FastAPI()
    log: list[str] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> Response:
        tasks.add_task(record, log, "injected")
        return PlainTextResponse("ok", background=BackgroundTask(record, log, "starlette's own"))

    assert call(app, "POST", "/").text == "ok"
    assert log == ["starlette's own", "injected"]


def test_returning_the_injected_collection_as_background_runs_it_once(call: Call) -> None:
    app = FastAPI()
    log: list[str] = []
    handles: list[TaskHandle] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> Response:
        handles.append(tasks.add_task(record, log, "once"))
        return PlainTextResponse("ok", background=tasks)

    assert call(app, "POST", "/").text == "ok"
    assert log == ["once"]
    assert handles[0].status == "done"


@pytest.mark.parametrize("error", ["exception", "http-exception"])
def test_when_the_endpoint_raises_queued_tasks_are_abandoned_visibly(
    error: str, call: Call, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    log: list[str] = []
    handles: list[TaskHandle] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(record, log, "never"))
        handles.append(tasks.add_task(record_async, log, "never either"))
        if error == "exception":
            raise LookupError("the endpoint broke")
        raise HTTPException(status_code=409, detail="conflict")

    response = call(app, "POST", "/", raise_server_exceptions=False)
    assert response.status_code == (500 if error == "exception" else 409)
    assert log == []
    assert [handle.status for handle in handles] == ["cancelled", "cancelled"]
    assert all(handle.started_at is None for handle in handles)
    abandoned = [event for event in sent if event.signal == "task_abandoned"]
    assert [event.kwargs["handle"] for event in abandoned] == handles
    assert [event.sender for event in abandoned] == [app, app]
    assert [event.signal for event in sent] == ["task_abandoned", "task_abandoned"]
    name = "LookupError" if error == "exception" else "HTTPException"
    for event in abandoned:
        assert name in event.kwargs["reason"]
    warnings = [
        record
        for record in caplog.records
        if record.name == "fastapi_bgplus" and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 2
    for warning, handle in zip(warnings, handles, strict=True):
        assert handle.task_id in warning.getMessage()
        assert handle.name in warning.getMessage()


def test_an_endpoint_that_raises_with_nothing_queued_is_left_alone(
    call: Call, sent: list[Sent]
) -> None:
    app = FastAPI()

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        raise HTTPException(status_code=404)

    assert call(app, "POST", "/").status_code == 404
    assert sent == []


@pytest.mark.skipif(
    FASTAPI < (0, 118),
    reason="FastAPI < 0.118 exits yield dependencies before the response is sent (README)",
)
@pytest.mark.parametrize("tasks_first", [True, False], ids=["tasks-then-db", "db-then-tasks"])
def test_a_yield_dependency_is_still_open_while_the_tasks_run(
    tasks_first: bool, call: Call
) -> None:
    app = FastAPI()
    app.state.sessions = []
    log: list[str] = []

    def queue(tasks: TrackedBackgroundTasks, db: FakeSession, db_sync: FakeSession) -> None:
        tasks.add_task(check_open, log, db)
        tasks.add_task(check_open_async, log, db)
        tasks.add_task(check_open, log, db_sync)

    if tasks_first:

        @app.post("/")
        async def endpoint(tasks: BackgroundTasks, db: Db, db_sync: DbSync) -> None:
            queue(tasks, db, db_sync)

    else:

        @app.post("/")
        async def endpoint_db_first(db: Db, db_sync: DbSync, tasks: BackgroundTasks) -> None:
            queue(tasks, db, db_sync)

    assert call(app, "POST", "/").status_code == 200
    assert log == [
        "sync task: session open=True",
        "async task: session open=True",
        "sync task: session open=True",
    ]
    assert [session.open for session in app.state.sessions] == [False, False]


@pytest.mark.parametrize("tasks_first", [True, False], ids=["tasks-then-db", "db-then-tasks"])
def test_a_yield_dependency_is_as_open_for_the_tasks_as_for_fastapi_s_own(
    tasks_first: bool, call: Call
) -> None:
    """Point 8 on every FastAPI: open from 0.118 on, closed before (README)."""
    app = FastAPI()
    app.state.sessions = []
    log: list[str] = []

    if tasks_first:

        @app.post("/ours")
        async def ours(tasks: BackgroundTasks, db: Db) -> None:
            tasks.add_task(check_open, log, db)

    else:

        @app.post("/ours")
        async def ours_db_first(db: Db, tasks: BackgroundTasks) -> None:
            tasks.add_task(check_open, log, db)

    @app.post("/fastapi")
    async def theirs(tasks: FastAPIBackgroundTasks, db: Db) -> None:
        tasks.add_task(check_open, log, db)

    assert call(app, "POST", "/ours").status_code == 200
    assert call(app, "POST", "/fastapi").status_code == 200
    assert log[0] == log[1] == f"sync task: session open={FASTAPI >= (0, 118)}"


@pytest.mark.skipif(
    FASTAPI < (0, 118),
    reason="FastAPI < 0.118 gives a provider no hook after the response: a response's"
    " own background drops the injected tasks (README)",
)
def test_when_the_response_s_own_background_raises_the_injected_tasks_are_abandoned(
    call: Call, sent: list[Sent]
) -> None:
    from starlette.background import BackgroundTask

    app = FastAPI()
    log: list[str] = []
    handles: list[TaskHandle] = []

    def own_task_fails() -> None:
        raise OSError("the response's own task broke")

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> Response:
        handles.append(tasks.add_task(record, log, "never"))
        return PlainTextResponse("ok", background=BackgroundTask(own_task_fails))

    assert call(app, "POST", "/", raise_server_exceptions=False).text == "ok"
    assert log == []
    assert [handle.status for handle in handles] == ["cancelled"]
    assert [(event.signal, event.kwargs["handle"]) for event in sent] == [
        ("task_abandoned", handles[0])
    ]
    assert "OSError" in sent[0].kwargs["reason"]


@pytest.mark.skipif(
    FASTAPI < (0, 121),
    reason="FastAPI < 0.121 has no request exit stacks: dropped tasks run at the"
    " provider's own exit, after the yield dependencies declared after it (README)",
)
@pytest.mark.parametrize("tasks_first", [True, False], ids=["tasks-then-db", "db-then-tasks"])
def test_with_a_response_background_a_yield_dependency_is_still_open_too(
    tasks_first: bool, call: Call
) -> None:
    """Points 6 and 8 together: FastAPI drops the injected tasks for the
    response's own background; they still run before any `yield` dependency
    exits, whatever the order of the parameters."""
    app = FastAPI()
    app.state.sessions = []
    log: list[str] = []

    def respond(tasks: TrackedBackgroundTasks, db: FakeSession) -> Response:
        tasks.add_task(check_open_async, log, db)
        own = BackgroundTasks()
        own.add_task(check_open, log, db)
        return PlainTextResponse("ok", background=own)

    if tasks_first:

        @app.post("/")
        async def endpoint(tasks: BackgroundTasks, db: Db) -> Response:
            return respond(tasks, db)

    else:

        @app.post("/")
        async def endpoint_db_first(db: Db, tasks: BackgroundTasks) -> Response:
            return respond(tasks, db)

    assert call(app, "POST", "/").text == "ok"
    assert log == ["sync task: session open=True", "async task: session open=True"]
    assert [session.open for session in app.state.sessions] == [False]


class DbFromAClass:
    """A `yield` dependency that is a callable instance, as FastAPI allows
    (its ``__call__`` takes no request: FastAPI cannot resolve the string
    annotations of an instance's method)."""

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []

    async def __call__(self, label: str = "primary") -> AsyncIterator[FakeSession]:
        session = FakeSession()
        self.sessions.append(session)
        try:
            yield session
        finally:
            session.open = False


def get_no_db() -> FakeSession:
    """A plain dependency, for `app.dependency_overrides` to replace."""
    return FakeSession()


async def db_behind_a_plain_dependency(db: Db) -> FakeSession:
    return db


def passed_through(func: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator whose wrapper is a plain function, as many are."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


db_from_a_class = DbFromAClass()
DbFromAnInstance = Annotated[FakeSession, Depends(db_from_a_class)]
DbNested = Annotated[FakeSession, Depends(db_behind_a_plain_dependency)]
DbPartial = Annotated[FakeSession, Depends(functools.partial(db_from_a_class, "replica"))]
DbWrapped = Annotated[FakeSession, Depends(passed_through(get_db))]
NoDb = Annotated[FakeSession, Depends(get_no_db)]
DB_FORMS = {
    "callable instance": DbFromAnInstance,
    "nested": DbNested,
    "override": NoDb,
    "partial": DbPartial,
    "wrapped": DbWrapped,
}


@pytest.mark.skipif(
    FASTAPI < (0, 121),
    reason="FastAPI < 0.121 exits yield dependencies declared after the provider first (README)",
)
@pytest.mark.parametrize(
    "form",
    [
        "callable instance",
        "nested",
        "override",
        pytest.param(
            "partial",
            marks=pytest.mark.skipif(FASTAPI < (0, 123, 6), reason="FastAPI >= 0.123.6 only"),
        ),
        pytest.param(
            "wrapped",
            marks=pytest.mark.skipif(FASTAPI < (0, 123, 6), reason="FastAPI >= 0.123.6 only"),
        ),
    ],
)
def test_every_form_of_yield_dependency_is_still_open_while_the_tasks_run(
    form: str, call: Call
) -> None:
    """Point 8 whatever the `yield` dependency looks like, declared after the
    tasks. An override set after the route has served requests counts too."""
    app = FastAPI()
    app.state.sessions = []
    sessions: list[FakeSession] = app.state.sessions
    log: list[str] = []

    if form in ("callable instance", "partial"):
        sessions = db_from_a_class.sessions = []

    async def endpoint(tasks: BackgroundTasks, db: FakeSession) -> None:
        tasks.add_task(check_open, log, db)

    # The dependency's form, as the annotation FastAPI reads (an object, not a string).
    endpoint.__annotations__["db"] = DB_FORMS[form]
    app.post("/")(endpoint)
    if form == "override":
        assert call(app, "POST", "/").status_code == 200
        assert log == ["sync task: session open=True"]  # a plain one: never closed
        log.clear()
        app.dependency_overrides[get_no_db] = get_db

    assert call(app, "POST", "/").status_code == 200
    assert log == ["sync task: session open=True"]
    assert [session.open for session in sessions] == [False]


def test_an_app_that_has_served_requests_can_be_garbage_collected(call: Call) -> None:
    app = FastAPI()
    log: list[str] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(record, log, "ran")

    assert call(app, "POST", "/").status_code == 200
    assert log == ["ran"]
    gone = weakref.ref(app)
    del app, endpoint
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("middleware", ["asgi", "http"])
def test_context_vars_of_the_request_reach_the_tasks(middleware: str, call: Call) -> None:
    app = FastAPI(dependencies=[Depends(set_tenant)])
    if middleware == "asgi":
        app.add_middleware(RequestIdMiddleware)
    else:

        @app.middleware("http")
        async def set_request_id(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            request_id.set("req-42")
            return await call_next(request)

    log: list[str] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        trace.set("trace-7")
        tasks.add_task(read_context_async, log)
        tasks.add_task(read_context, log)

    assert call(app, "POST", "/").status_code == 200
    assert log == ["async: req-42 acme trace-7", "sync: req-42 acme trace-7"]


def test_context_vars_of_a_yield_dependency_reach_the_tasks(call: Call) -> None:
    app = FastAPI()
    log: list[str] = []

    @app.post("/", dependencies=[Depends(set_tenant_and_yield)])
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(read_context_async, log)
        tasks.add_task(read_context, log)

    assert call(app, "POST", "/").status_code == 200
    assert log == ["async: - acme -", "sync: - acme -"]


def test_signals_of_a_request_are_sent_by_its_app(call: Call, sent: list[Sent]) -> None:
    app = FastAPI()
    log: list[str] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(record, log, "x")

    call(app, "POST", "/")
    assert [(event.signal, event.sender) for event in sent] == [
        ("task_started", app),
        ("task_completed", app),
    ]


def test_tasks_of_a_tracked_app_are_tracked(anyio_backend: Literal["asyncio", "trio"]) -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    log: list[str] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, str]:
        handle = tasks.add_task(record, log, "tracked")
        assert tracker.get(handle.task_id) is handle
        return {"task_id": handle.task_id}

    with TestClient(app, backend=anyio_backend) as client:
        task_id = client.post("/").json()["task_id"]
        handle = tracker.get(task_id)
        assert handle is not None
        assert handle.status == "done"
        assert tracker.in_flight == []
    assert log == ["tracked"]


def test_tasks_get_the_request_values_they_were_given(call: Call) -> None:
    """Arguments are forwarded as they are, positional and keyword."""
    app = FastAPI()
    got: list[Any] = []

    def task(*args: Any, **kwargs: Any) -> None:
        got.append((args, kwargs))

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        tasks.add_task(task, 1, "two", three=[3], four={"4": 4})

    call(app, "POST", "/")
    assert got == [((1, "two"), {"three": [3], "four": {"4": 4}})]


# Cut off at shutdown while a request is still in flight


class Served:
    """Runs `app` under a `TaskTracker` lifespan entered by the test, passing
    the lifespan state to each request as ASGI servers do."""

    def __init__(self, app: FastAPI, tracker: TaskTracker) -> None:
        self.app = app
        self.tracker = tracker
        self.state: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "state": dict(self.state)}, receive, send)

    async def post(self, path: str) -> httpx2.Response:
        transport = httpx2.ASGITransport(app=self)
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post(path)


@pytest.mark.anyio
async def test_a_task_cut_off_before_its_collection_ran_never_runs(sent: list[Sent]) -> None:
    tracker = TaskTracker(drain_timeout=0)
    app = FastAPI()
    served = Served(app, tracker)
    in_endpoint, resume = anyio.Event(), anyio.Event()
    log: list[str] = []
    handles: list[TaskHandle] = []
    responses: list[httpx2.Response] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(record, log, "after shutdown"))
        in_endpoint.set()
        await resume.wait()

    async def post() -> None:
        responses.append(await served.post("/"))

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(app) as state:
            served.state = state
            tg.start_soon(post)
            await in_endpoint.wait()
        (handle,) = handles
        assert handle.status == "cancelled"
        resume.set()
    assert responses[0].status_code == 200
    assert log == []
    assert handle.status == "cancelled"
    assert handle.started_at is None
    assert [(event.signal, event.kwargs["handle"]) for event in sent] == [
        ("task_abandoned", handle)
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["returns", "raises"])
async def test_a_task_reported_lost_keeps_its_cancelled_status_when_it_ends(
    outcome: str, sent: list[Sent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that swallows its cancellation outlives the drain: it is reported
    lost then, and whatever it does afterwards does not change that."""
    tracker = TaskTracker(drain_timeout=0, shutdown_grace=0)
    app = FastAPI()
    served = Served(app, tracker)
    running, release = anyio.Event(), anyio.Event()
    log: list[str] = []
    handles: list[TaskHandle] = []

    async def stubborn() -> None:
        try:
            running.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await release.wait()
            log.append("ended after the drain")
            if outcome == "raises":
                raise ValueError("too late") from None
        # Swallows its cancellation (a bug in the task; the tracker copes).

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> None:
        handles.append(tasks.add_task(stubborn))
        handles.append(tasks.add_task(record, log, "never"))

    async with anyio.create_task_group() as tg:
        async with tracker.lifespan(app) as state:
            served.state = state
            tg.start_soon(served.post, "/")
            await running.wait()
        assert [handle.status for handle in handles] == ["cancelled", "cancelled"]
        release.set()
    assert log == ["ended after the drain"]
    assert [handle.status for handle in handles] == ["cancelled", "cancelled"]
    assert all(handle.error is None for handle in handles)
    assert [(event.signal, event.kwargs["handle"]) for event in sent] == [
        ("task_started", handles[0]),
        ("task_abandoned", handles[0]),
        ("task_abandoned", handles[1]),
    ]
