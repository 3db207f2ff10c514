"""0.3's promises beyond the core: a bounded shutdown, observers, the running
task's handle and log context, concurrency limits and backpressure, install
into any app, first contact that never fails silently, mocks of the imported
name, and every FastAPI route type."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import anyio
import anyio.lowlevel
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import fastapi_bgplus
from fastapi_bgplus import (
    BackgroundTasks,
    MemoryStore,
    NotServing,
    QueueFull,
    TaskContextFilter,
    TaskHandle,
    TaskObserver,
    TaskTracker,
    TrackedBackgroundTasks,
    current_task,
    get_background_tasks,
    signals,
    task,
)
from tests.asgi import request

pytestmark = pytest.mark.anyio

Backend = Literal["asyncio", "trio"]


async def noop() -> None:
    pass


# A bounded shutdown


async def test_a_hanging_abandoned_receiver_does_not_hold_up_the_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = TaskTracker(drain_timeout=0.1, shutdown_grace=0.3)
    app = FastAPI(lifespan=tracker.lifespan)
    heard: list[str] = []

    async def hangs(sender: Any, **kwargs: Any) -> None:
        heard.append(kwargs["task_id"])
        await anyio.sleep_forever()

    @app.post("/many")
    async def many(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"ids": [tasks.add_task(anyio.sleep_forever).task_id for _ in range(50)]}

    signals.task_abandoned.connect(hangs, weak=False)
    try:
        async with anyio.create_task_group() as group:
            started = anyio.current_time()
            async with tracker.lifespan(app) as state:
                group.start_soon(request, app, state, "/many")
                await anyio.wait_all_tasks_blocked()
            elapsed = anyio.current_time() - started
            group.cancel_scope.cancel()
    finally:
        signals.task_abandoned.disconnect(hangs)
    assert elapsed < 0.1 + 0.3 + 0.5
    assert len(tracker.in_flight) == 0
    assert "50 abandoned" in caplog.text
    assert heard  # the first receiver was called; those past the grace were skipped


async def test_a_failed_request_s_abandon_is_bounded_by_the_grace_too() -> None:
    tracker = TaskTracker(shutdown_grace=0.1)
    app = FastAPI(lifespan=tracker.lifespan)
    handles: list[TaskHandle] = []

    async def hangs(sender: Any, **kwargs: Any) -> None:
        await anyio.sleep_forever()

    @app.post("/fails")
    async def fails(tasks: BackgroundTasks) -> None:
        handles.extend(tasks.add_task(noop) for _ in range(3))
        raise RuntimeError("the endpoint failed")

    signals.task_abandoned.connect(hangs, weak=False)
    try:
        with anyio.fail_after(5):
            async with tracker.lifespan(app) as state:
                with pytest.raises(RuntimeError, match="the endpoint failed"):
                    await request(app, state, "/fails")
    finally:
        signals.task_abandoned.disconnect(hangs)
    assert [handle.status for handle in handles] == ["cancelled"] * 3


def test_shutdown_grace_must_be_finite_seconds() -> None:
    for bad in (-1, math.inf, math.nan, 10**400, "5"):
        with pytest.raises(ValueError, match="shutdown_grace must be a number of seconds"):
            TaskTracker(shutdown_grace=bad)  # type: ignore[arg-type]


# Observers, current_task(), TaskContextFilter


class Audit(TaskObserver):
    def __init__(self) -> None:
        self.heard: list[str] = []

    def task_queued(self, handle: TaskHandle, tasks: Any) -> None:
        self.heard.append(f"queued {handle.status}")

    def task_started(self, handle: TaskHandle) -> None:
        self.heard.append(f"started {handle.status} {handle.attempts}")

    def task_ended(self, handle: TaskHandle) -> None:
        self.heard.append(f"ended {handle.status}")


class Broken(TaskObserver):
    def task_started(self, handle: TaskHandle) -> None:
        raise RuntimeError("the observer is broken")


async def test_observers_hear_every_transition_and_a_raising_one_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = Audit()
    tracker = TaskTracker(observers=[Broken(), audit])
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    async with tracker.lifespan(app) as state:
        _, body = await request(app, state, "/")
    assert audit.heard == ["queued pending", "started running 1", "ended done"]
    assert tracker.get(body["id"]).status == "done"  # type: ignore[union-attr]
    assert "the observer is broken" in caplog.text or "Broken" in caplog.text


def test_observers_must_be_task_observers() -> None:
    with pytest.raises(TypeError, match="observers must be TaskObserver instances"):
        TaskTracker(observers=[object()])  # type: ignore[list-item]


async def test_current_task_and_the_log_filter_inside_async_and_def_tasks() -> None:
    seen: list[tuple[Any, Any]] = []
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(TaskContextFilter())
    log = logging.getLogger("tests.task_context")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def in_async() -> None:
        seen.append(("async", current_task()))
        log.info("from the async task")

    def in_thread() -> None:
        seen.append(("def", current_task()))
        log.info("from the def task")

    try:
        tasks = TrackedBackgroundTasks()
        first = tasks.add_task(in_async)
        second = tasks.add_task(in_thread)
        await tasks.run()
        log.info("outside")
    finally:
        log.removeHandler(handler)
    assert seen == [("async", first), ("def", second)]
    assert current_task() is None
    assert [(r.task_id, r.task_name) for r in records] == [  # type: ignore[attr-defined]
        (first.task_id, first.name),
        (second.task_id, second.name),
        (None, None),
    ]


# Flow control


@pytest.mark.parametrize("limit", [1, 3])
async def test_task_concurrency_is_never_exceeded_and_first_come_first_served(limit: int) -> None:
    running = peak = 0
    order: list[int] = []
    gate = anyio.Event()

    @task(concurrency=limit)
    async def limited(number: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(number)
        await gate.wait()
        await anyio.lowlevel.checkpoint()
        running -= 1

    collections = []
    for number in range(8):
        tasks = TrackedBackgroundTasks()
        tasks.add_task(limited, number)
        collections.append(tasks)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            for tasks in collections:
                group.start_soon(tasks.run)
                await anyio.wait_all_tasks_blocked()  # each arrives in turn
            assert [h.status.value for t in collections for h in t.handles].count(
                "pending"
            ) == 8 - limit
            gate.set()
    assert peak == limit
    if limit == 1:  # one at a time: the order they start in is the order they came
        assert order == list(range(8))
    assert sorted(order) == list(range(8))
    assert all(h.status == "done" for tasks in collections for h in tasks.handles)


def test_concurrency_must_be_a_positive_int() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"task\(concurrency=\.\.\.\) must be an int >= 1"):
            task(concurrency=bad)  # type: ignore[arg-type]


async def test_a_full_detached_queue_answers_queue_full_and_loses_nothing_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = TaskTracker(detach=True, max_concurrent=1, max_queued=1, drain_timeout=0)
    app = FastAPI(lifespan=tracker.lifespan)
    gate = anyio.Event()
    running = 0
    peak = 0

    async def held() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1

    @app.exception_handler(QueueFull)
    async def busy(request: Any, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, {"Retry-After": "5"})

    @app.post("/work")
    async def work(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(held).task_id}

    with anyio.fail_after(10):
        async with tracker.lifespan(app) as state:
            answers = []
            for _ in range(3):
                answers.append(await request(app, state, "/work"))
                await anyio.wait_all_tasks_blocked()
            assert [status for status, _ in answers] == [200, 200, 503]
            assert "queue is full" in answers[2][1]["detail"]
            waiting = tracker.get(answers[1][1]["id"])
            assert waiting is not None
            assert waiting.status == "pending"  # waits its turn
            assert peak == 1
    # The drain cut both off, the waiting one named like any other.
    assert waiting.status == "cancelled"
    assert waiting.task_id in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"detach": True, "max_concurrent": 0}, "max_concurrent must be an int >= 1"),
        ({"detach": True, "max_concurrent": 2, "max_queued": -1}, "max_queued must be an int"),
        ({"detach": True, "max_concurrent": 1.5}, "max_concurrent must be an int >= 1"),
        ({"max_concurrent": 2}, "pass detach=True too"),
        ({"detach": True, "max_queued": 2}, "pass detach=True and max_concurrent=N too"),
    ],
)
def test_flow_control_arguments_say_what_is_valid(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskTracker(**kwargs)


# install() into any app


def test_install_keeps_old_style_startup_handlers_running(anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    app = FastAPI()
    events: list[str] = []
    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):

        @app.on_event("startup")
        async def startup() -> None:
            events.append("startup")

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    tracker.install(app)
    with TestClient(app, backend=anyio_backend) as client:
        task_id = client.post("/").json()["id"]
        assert tracker.get(task_id).status == "done"  # type: ignore[union-attr]
    assert events == ["startup"]


def test_install_wraps_an_existing_lifespan(anyio_backend: Backend) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        events.append("up")
        yield {"db": "open"}
        events.append("down")

    tracker = TaskTracker()
    app = Starlette(lifespan=lifespan, routes=[Route("/", lambda r: JSONResponse(r.state.db))])
    tracker.install(app)
    with TestClient(app, backend=anyio_backend) as client:
        assert client.get("/").json() == "open"
        assert tracker.serving
    assert events == ["up", "down"]
    assert not tracker.serving


def test_install_refuses_what_is_not_a_starlette_app() -> None:
    with pytest.raises(TypeError, match="install\\(\\) takes a Starlette or FastAPI application"):
        TaskTracker().install(object())


# First contact


def test_a_tracker_whose_lifespan_does_not_run_answers_503_saying_how_to_install_it(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router("/tasks"))
    app.mount("/static", Starlette())

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    client = TestClient(app, backend=anyio_backend)  # no `with`: the lifespan never runs
    task_id = client.post("/").json()["id"]
    response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 503
    assert "lifespan=tracker.lifespan" in response.json()["detail"]
    assert "tracker.install(app)" in response.json()["detail"]
    assert "lifespan is not running" in caplog.text


def test_a_mounted_sub_app_s_own_tracker_warns_and_answers_503(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = TaskTracker()
    sub = FastAPI(lifespan=tracker.lifespan)  # Starlette never runs it, mounted
    sub.include_router(tracker.router("/tasks"))

    @sub.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    outer = Starlette(routes=[Mount("/sub", sub)])
    with TestClient(outer, backend=anyio_backend) as client:
        task_id = client.post("/sub/").json()["id"]
        client.post("/sub/")
        response = client.get(f"/sub/tasks/{task_id}")
    assert response.status_code == 503
    assert "mounted sub-app" in response.json()["detail"]
    assert caplog.text.count("lifespan is not running") == 1  # once per app


async def test_lookup_outside_the_lifespan_raises_not_serving() -> None:
    with pytest.raises(NotServing, match=r"tracker\.install"):
        await TaskTracker().lookup("0" * 32)


async def test_lookup_of_none_or_a_malformed_id_is_none_with_or_without_a_store() -> None:
    for tracker in (TaskTracker(), TaskTracker(store=MemoryStore())):
        async with tracker.lifespan(None):
            assert await tracker.lookup(None) is None
            assert await tracker.lookup("nope") is None


async def test_a_store_that_hangs_makes_lookup_time_out() -> None:
    class Hangs(MemoryStore):
        async def get(self, task_id: str) -> Any:
            await anyio.sleep_forever()

    tracker = TaskTracker(store=Hangs(), store_timeout=0.05)
    with anyio.fail_after(5):
        async with tracker.lifespan(None):
            with pytest.raises(TimeoutError):
                await tracker.lookup("0" * 32)


async def test_waiting_for_a_task_in_the_request_that_queued_it_raises_at_once() -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    said: list[str] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        handle = tasks.add_task(noop)
        with pytest.raises(RuntimeError, match="would never return") as caught:
            await handle.wait()
        said.append(str(caught.value))
        return {"id": handle.task_id}

    async with tracker.lifespan(app) as state:
        status, body = await request(app, state, "/")
        handle = tracker.get(body["id"])
        assert handle is not None
        await handle.wait()  # after the response, elsewhere: it returns
    assert status == 200
    assert said
    assert handle.status == "done"


# Mocks of the imported name


def test_patching_add_task_on_the_imported_name_intercepts_the_injected_collection(
    anyio_backend: Backend,
) -> None:
    app = FastAPI()

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        tasks.add_task(noop)
        return {}

    with TestClient(app, backend=anyio_backend) as client:
        with mock.patch("fastapi_bgplus.BackgroundTasks.add_task") as patched:
            client.post("/")
        patched.assert_called_once_with(noop)
        with mock.patch.object(BackgroundTasks, "add_task") as patched:
            client.post("/")
        patched.assert_called_once_with(noop)
    # Restored: a real handle again.
    assert isinstance(TrackedBackgroundTasks().add_task(noop), TaskHandle)
    assert fastapi_bgplus.BackgroundTasks.add_task is TrackedBackgroundTasks.add_task


def test_dependency_overrides_are_keyed_by_get_background_tasks(anyio_backend: Backend) -> None:
    app = FastAPI()
    fake = TrackedBackgroundTasks()

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"same": tasks is fake}

    app.dependency_overrides[get_background_tasks] = lambda: fake
    with TestClient(app, backend=anyio_backend) as client:
        assert client.post("/").json() == {"same": True}


# Every route type


def test_a_frontend_route_s_dependency_gets_the_request_s_tasks(
    anyio_backend: Backend, tmp_path: Path
) -> None:
    """As FastAPI's own tests/test_frontend.py serves a build: app-level
    dependencies run for the frontend's files, and that route type sets no
    ``scope["route"]``."""
    ran = threading.Event()

    def record() -> None:
        ran.set()

    async def queue(tasks: BackgroundTasks) -> None:
        tasks.add_task(record)

    app = FastAPI(dependencies=[Depends(queue)])
    if not hasattr(app, "frontend"):
        pytest.skip("app.frontend() routes came with FastAPI 0.165")
    (tmp_path / "index.html").write_text("<h1>app</h1>")
    app.frontend("/", directory=tmp_path)
    with TestClient(app, backend=anyio_backend) as client:
        response = client.get("/")
    assert response.status_code == 200, response.text
    assert "<h1>app</h1>" in response.text
    assert ran.is_set()


def test_an_app_given_the_lifespan_alone_but_not_run_warns_too(
    anyio_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    TestClient(app, backend=anyio_backend).post("/")
    assert "lifespan is not running" in caplog.text


async def test_a_history_without_a_ttl_keeps_what_ended() -> None:
    tracker = TaskTracker(history_ttl=None)
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    async with tracker.lifespan(app) as state:
        _, body = await request(app, state, "/")
    assert tracker.get(body["id"]).status == "done"  # type: ignore[union-attr]


def test_a_task_function_s_repr_shows_its_concurrency() -> None:
    @task(concurrency=2)
    async def limited() -> None:
        pass

    assert repr(limited).endswith("concurrency=2>")


async def test_a_store_that_fails_at_startup_and_at_close_fails_the_startup_alone() -> None:
    class Down(MemoryStore):
        async def renew_lease(self, owner: str, ttl: float) -> None:
            raise ConnectionError("down")

        async def aclose(self) -> None:
            raise ConnectionError("still down")

    tracker = TaskTracker(store=Down())
    with pytest.raises(RuntimeError, match="could not reach its task store"):
        async with tracker.lifespan(None):
            pass  # pragma: no cover
    assert not tracker.serving


def test_a_late_task_from_a_thread_once_the_loop_has_closed_is_still_ended(
    anyio_backend: Backend,
) -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    kept: list[TrackedBackgroundTasks] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        kept.append(tasks)
        return {}

    async def serve() -> None:
        async with tracker.lifespan(app) as state:
            await request(app, state, "/")

    anyio.run(serve, backend=anyio_backend)
    late: list[TaskHandle] = []
    thread = threading.Thread(target=lambda: late.append(kept[0].add_task(noop)))
    thread.start()
    thread.join()
    assert late[0].status == "cancelled"


async def test_a_failed_request_gives_its_place_in_the_queue_back() -> None:
    tracker = TaskTracker(detach=True, max_concurrent=1, max_queued=0)
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/fails")
    async def fails(tasks: BackgroundTasks) -> None:
        tasks.add_task(noop)
        raise RuntimeError("the endpoint failed")

    @app.post("/works")
    async def works(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(noop).task_id}

    async with tracker.lifespan(app) as state:
        for _ in range(3):
            with pytest.raises(RuntimeError, match="the endpoint failed"):
                await request(app, state, "/fails")
        status, body = await request(app, state, "/works")
        await anyio.wait_all_tasks_blocked()
        assert status == 200
        assert tracker.get(body["id"]).status == "done"  # type: ignore[union-attr]
        status, _ = await request(app, state, "/works")  # its place is free again
        assert status == 200


async def test_max_concurrent_without_max_queued_runs_everything_in_turn() -> None:
    tracker = TaskTracker(detach=True, max_concurrent=2)
    app = FastAPI(lifespan=tracker.lifespan)
    running = peak = 0

    async def counted() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.lowlevel.checkpoint()
        running -= 1

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        return {"id": tasks.add_task(counted).task_id}

    async with tracker.lifespan(app) as state:
        ids = [(await request(app, state, "/"))[1]["id"] for _ in range(6)]
    assert peak <= 2
    assert [tracker.get(i).status for i in ids] == ["done"] * 6  # type: ignore[union-attr]
