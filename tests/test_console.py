"""The console (issue 25): `tracker.list()`, `stats()`, `cancel()`, their
routes, and what they never show.

Two trackers sharing one store stand for two worker processes; a real
``uvicorn --workers 2`` run is in `tests/test_console_servers.py`, the
dashboard in a real browser in `tests/test_dashboard_browser.py`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_bgplus import (
    BackgroundTasks,
    MemoryStore,
    NotServing,
    TaskHandle,
    TaskStore,
    TaskTracker,
    TrackedBackgroundTasks,
    signals,
)

pytestmark = pytest.mark.anyio

Backend = Literal["asyncio", "trio"]
DEADLINE = 5.0
SECRET = "s3cret-token-4711"  # an argument, and an exception message: never shown


async def noop(secret: str = SECRET) -> None:
    pass


MESSAGE = "the mail server said no"


async def boom(secret: str = SECRET) -> None:
    raise ValueError(MESSAGE)


def collection(state: Mapping[str, Any]) -> TrackedBackgroundTasks:
    """A collection tracked by the tracker in the lifespan `state`, as a request's is."""
    return TrackedBackgroundTasks.for_request({"type": "http", "state": dict(state)})


async def run(state: Mapping[str, Any], *funcs: Any) -> list[TaskHandle]:
    tasks = collection(state)
    handles = [tasks.add_task(func) for func in funcs]
    await tasks.run()
    return handles


async def until(condition: Any, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < DEADLINE, what
        await anyio.sleep(0.01)


class Gate:
    """An async task that runs until `release` is set; `running` once started."""

    def __init__(self) -> None:
        self.running = anyio.Event()
        self.release = anyio.Event()
        self.__name__ = self.__qualname__ = "Gate"

    async def __call__(self) -> None:
        self.running.set()
        await self.release.wait()


# list()


async def test_list_answers_the_newest_first_and_pages_visit_each_task_once() -> None:
    tracker = TaskTracker()
    async with tracker.lifespan(None) as state:
        handles = await run(state, *[noop] * 7)
        first = await tracker.list(limit=3)
        assert [r["task_id"] for r in first["items"]] == [h.task_id for h in handles[::-1][:3]]
        seen: list[str] = []
        cursor = None
        while True:
            page = await tracker.list(limit=3, cursor=cursor)
            seen += [record["task_id"] for record in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [handle.task_id for handle in reversed(handles)]
        assert first["items"][0] == handles[-1].to_dict()


async def test_list_filters_by_status_name_and_time() -> None:
    tracker = TaskTracker()
    async with tracker.lifespan(None) as state:
        done, failed = await run(state, noop, boom)
        moment = datetime.now(timezone.utc)
        (later,) = await run(state, noop)
        gate = Gate()
        tasks = collection(state)
        running = tasks.add_task(gate)
        pending = tasks.add_task(noop)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.run)
            await gate.running.wait()

            async def ids(**filters: Any) -> list[str]:
                return [r["task_id"] for r in (await tracker.list(**filters))["items"]]

            assert await ids(status="failed") == [failed.task_id]
            assert await ids(status=["done", "running"]) == [
                running.task_id,
                later.task_id,
                done.task_id,
            ]
            assert await ids(status=("pending",)) == [pending.task_id]
            assert await ids(name=boom.__module__ + ".boom") == [failed.task_id]
            assert await ids(since=moment) == [pending.task_id, running.task_id, later.task_id]
            naive = moment.replace(tzinfo=None)  # a naive datetime is UTC
            assert await ids(since=naive) == await ids(since=moment)
            assert await ids(status="lost") == []
            gate.release.set()


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"status": "finished"}, "status must be one of pending, running, done, failed"),
        ({"status": []}, "status must be one of"),
        ({"limit": 0}, "limit must be an int from 1 to 1000"),
        ({"limit": 1001}, "limit must be an int from 1 to 1000"),
        ({"cursor": "not-a-cursor"}, "pass the next_cursor of the previous page"),
        ({"cursor": "WyJ4IiwgMV0"}, "pass the next_cursor of the previous page"),  # ["x", 1]
        ({"since": 12.5}, "since must be a datetime"),
        ({"name": 3}, "name must be a task name"),
    ],
)
async def test_list_refuses_bad_arguments_saying_what_is_valid(
    filters: dict[str, Any], message: str
) -> None:
    tracker = TaskTracker()
    async with tracker.lifespan(None):
        with pytest.raises(ValueError, match=message):
            await tracker.list(**filters)


async def test_the_console_needs_the_lifespan() -> None:
    tracker = TaskTracker()
    for call in (tracker.list(), tracker.stats(), tracker.cancel("a" * 32)):
        with pytest.raises(NotServing, match=r"lifespan=tracker\.lifespan"):
            await call


async def test_list_and_stats_answer_for_every_process_sharing_the_store() -> None:
    store = MemoryStore()
    one, two = TaskTracker(store=store), TaskTracker(store=store)
    async with one.lifespan(None) as state_one, two.lifespan(None):
        done, failed = await run(state_one, noop, boom)
        gate = Gate()
        tasks = collection(state_one)
        running = tasks.add_task(gate)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.run)
            await gate.running.wait()

            async def seen_by_two() -> list[str]:
                return [r["task_id"] for r in (await two.list())["items"]]

            wanted = [running.task_id, failed.task_id, done.task_id]
            started = time.monotonic()
            while await seen_by_two() != wanted:  # written within a flush interval
                assert time.monotonic() - started < DEADLINE
                await anyio.sleep(0.05)
            assert (await two.list(status="running"))["items"][0]["status"] == "running"
            stats = await two.stats()
            assert stats["total"]["statuses"]["failed"] == 1
            assert stats["total"]["in_flight"] == 1
            gate.release.set()


async def test_an_unfinished_task_of_a_dead_process_lists_as_lost() -> None:
    store = MemoryStore()
    record = {
        "task_id": "d" * 32,
        "name": "app.resize",
        "status": "running",
        "created_at": datetime.now(timezone.utc).isoformat(),
        "started_at": None,
        "finished_at": None,
        "duration_s": None,
        "error": None,
        "attempts": 1,
        "owner": "4242-deaddeaddeaddead",  # no lease: the process is gone
    }
    asked: list[str] = []

    class Counting(MemoryStore):
        async def lease_alive(self, owner: str) -> bool:
            asked.append(owner)
            return await super().lease_alive(owner)

    store = Counting()
    await store.put([record, {**record, "task_id": "e" * 32}], history_ttl=None)
    tracker = TaskTracker(store=store)
    async with tracker.lifespan(None):
        lost, also_lost = (await tracker.list(status="lost"))["items"]
        assert lost["status"] == also_lost["status"] == "lost"
        assert asked == ["4242-deaddeaddeaddead"]  # one question per owner and page
        assert "owner" not in lost
        await store.put([{**record, "task_id": "e" * 32, "status": "done"}], history_ttl=None)
        assert (await tracker.list(status="running"))["items"] == []
        stats = await tracker.stats()
        assert stats["tasks"]["app.resize"]["statuses"]["lost"] == 1
        assert stats["total"]["in_flight"] == 0


async def test_a_store_without_the_console_methods_says_what_it_lacks() -> None:
    class OldStore:  # a TaskStore written for 0.2
        def __init__(self) -> None:
            self.inner = MemoryStore()

        async def put(self, records: Any, *, history_ttl: float | None) -> None:
            await self.inner.put(records, history_ttl=history_ttl)

        async def get(self, task_id: str) -> Any:
            return await self.inner.get(task_id)

        async def renew_lease(self, owner: str, ttl: float) -> None:
            await self.inner.renew_lease(owner, ttl)

        async def lease_alive(self, owner: str) -> bool:
            return await self.inner.lease_alive(owner)

        async def aclose(self) -> None:
            pass

    store: TaskStore = OldStore()
    tracker = TaskTracker(store=store)
    async with tracker.lifespan(None) as state:
        (handle,) = await run(state, noop)
        assert (await tracker.lookup(handle.task_id)) is not None
        with pytest.raises(NotImplementedError, match=r"implement query\(\).*ConsoleStore"):
            await tracker.list()
        assert not await tracker.cancel("e" * 32)


# stats()


async def test_stats_count_per_task_and_in_total_with_percentiles() -> None:
    tracker = TaskTracker()

    async def sleepy() -> None:
        await anyio.sleep(0.05)

    async with tracker.lifespan(None) as state:
        await run(state, *[noop] * 18, sleepy, sleepy, boom, boom)
        stats = await tracker.stats(window=60)
    assert stats["window_s"] == 60.0
    assert stats["complete"] is True
    total = stats["total"]
    assert total["count"] == 22
    assert total["statuses"] == {
        "pending": 0,
        "running": 0,
        "done": 20,
        "failed": 2,
        "cancelled": 0,
        "lost": 0,
    }
    assert total["failure_rate"] == pytest.approx(2 / 22)
    assert total["p50_s"] < 0.05 <= total["p95_s"]
    by_name = stats["tasks"]
    assert set(by_name) == {
        f"{__name__}.noop",
        f"{__name__}.boom",
        sleepy.__qualname__.join([f"{__name__}.", ""]),
    }
    assert by_name[f"{__name__}.boom"]["failure_rate"] == 1.0
    assert by_name[f"{__name__}.noop"]["failure_rate"] == 0.0


async def test_stats_of_an_empty_window_and_a_bad_one() -> None:
    tracker = TaskTracker()
    async with tracker.lifespan(None):
        stats = await tracker.stats()
        assert stats["total"]["count"] == 0
        assert stats["total"]["p95_s"] is None
        assert stats["total"]["failure_rate"] is None
        assert stats["tasks"] == {}
        with pytest.raises(ValueError, match="window must be a number of seconds > 0"):
            await tracker.stats(window=0)


async def test_stats_leave_out_what_was_queued_before_the_window() -> None:
    tracker = TaskTracker()
    async with tracker.lifespan(None) as state:
        await run(state, noop, noop)
        await anyio.sleep(0.3)
        await run(state, noop)
        assert (await tracker.stats(window=0.2))["total"]["count"] == 1
        assert (await tracker.stats(window=60))["total"]["count"] == 3


# cancel()


async def test_cancel_a_pending_task_ends_it_and_the_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = TaskTracker()
    abandoned: list[tuple[str, str]] = []

    def heard(sender: Any, task_id: str, reason: str, **kwargs: Any) -> None:
        abandoned.append((task_id, reason))

    gate = Gate()
    ran: list[str] = []

    async def after() -> None:
        ran.append("after")

    with signals.task_abandoned.connected_to(heard):
        async with tracker.lifespan(None) as state:
            tasks = collection(state)
            first = tasks.add_task(gate)
            skipped = tasks.add_task(noop)
            last = tasks.add_task(after)
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.run)
                await gate.running.wait()
                assert await tracker.cancel(skipped.task_id.upper(), reason="the user gave up")
                assert skipped.status == "cancelled"
                gate.release.set()
    assert first.status == "done"
    assert last.status == "done"
    assert ran == ["after"]
    assert abandoned == [(skipped.task_id, "the user gave up")]
    assert any(
        r.levelno == logging.WARNING
        and skipped.task_id in r.getMessage()
        and "gave up" in r.getMessage()
        for r in caplog.records
    )


async def test_cancel_the_running_task_cuts_it_off_and_the_next_runs() -> None:
    tracker = TaskTracker()
    gate = Gate()
    async with tracker.lifespan(None) as state:
        tasks = collection(state)
        running = tasks.add_task(gate)
        after = tasks.add_task(noop)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.run)
            await gate.running.wait()
            assert await tracker.cancel(running.task_id)
            await until(lambda: after.finished, "the next task never ran")
        assert running.status == "cancelled"
        assert after.status == "done"
        assert (await tracker.lookup(running.task_id) or {})["status"] == "cancelled"
        # Cancelling a finished or unknown task finds nothing.
        assert not await tracker.cancel(running.task_id)
        assert not await tracker.cancel("f" * 32)
        assert not await tracker.cancel("not an id")
        with pytest.raises(ValueError, match="reason must be a non-empty string"):
            await tracker.cancel(after.task_id, reason="")


async def test_cancel_a_running_def_task_ends_its_handle_and_the_thread_finishes() -> None:
    tracker = TaskTracker()
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(DEADLINE)
        finished.set()

    async with tracker.lifespan(None) as state:
        tasks = collection(state)
        handle = tasks.add_task(blocking)
        after = tasks.add_task(noop)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.run)
            await anyio.to_thread.run_sync(started.wait, DEADLINE)
            assert await tracker.cancel(handle.task_id)
            await until(lambda: after.finished, "the next task never ran")
        assert handle.status == "cancelled"
        assert not finished.is_set()  # the thread runs on, on its own
        release.set()
        await anyio.to_thread.run_sync(finished.wait, DEADLINE)
        assert finished.is_set()
        assert handle.status == "cancelled"


async def test_cancel_reaches_the_task_of_another_process_through_the_store() -> None:
    store = MemoryStore()
    runs_it, asks = TaskTracker(store=store), TaskTracker(store=store)
    gate = Gate()
    async with runs_it.lifespan(None) as state, asks.lifespan(None):
        tasks = collection(state)
        handle = tasks.add_task(gate)
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.run)
            await gate.running.wait()
            started = time.monotonic()
            while (await asks.lookup(handle.task_id) or {}).get("status") != "running":
                assert time.monotonic() - started < DEADLINE
                await anyio.sleep(0.02)
            assert await asks.cancel(handle.task_id, reason="stopped by the operator")
            asked = time.monotonic()
            await until(lambda: handle.finished, "the other process never cancelled it")
            assert time.monotonic() - asked < 1.5  # picked up within about a second
        assert handle.status == "cancelled"
        # Finished now: nothing to cancel.
        started = time.monotonic()
        while (await asks.lookup(handle.task_id) or {}).get("status") != "cancelled":
            assert time.monotonic() - started < DEADLINE
            await anyio.sleep(0.02)
        assert not await asks.cancel(handle.task_id)


async def test_cancel_from_a_detached_tracker_and_a_waiting_collection() -> None:
    tracker = TaskTracker(detach=True, max_concurrent=1)
    gate = Gate()
    async with tracker.lifespan(None) as state:
        first = collection(state)
        blocking = first.add_task(gate)
        await first.end_request(None)
        await gate.running.wait()
        second = collection(state)
        waiting = second.add_task(noop)
        await second.end_request(None)
        assert await tracker.cancel(waiting.task_id)  # its collection waits for a slot
        assert waiting.status == "cancelled"
        gate.release.set()
        await until(lambda: blocking.finished, "the first never ended")
    assert blocking.status == "done"


# Routes


@asynccontextmanager
async def nothing(app: Any) -> AsyncIterator[None]:
    yield


def console_app(tracker: TaskTracker, **router: Any) -> FastAPI:
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router("/tasks", **router))

    @app.post("/work")
    async def work(background: BackgroundTasks, fail: bool = False) -> dict[str, str]:
        handle = background.add_task(boom if fail else noop, SECRET)
        return {"task_id": handle.task_id}

    return app


def test_the_list_and_stats_routes(anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    with TestClient(console_app(tracker), backend=anyio_backend) as client:
        ok = client.post("/work").json()["task_id"]
        failed = client.post("/work?fail=true").json()["task_id"]
        page = client.get("/tasks").json()
        assert [r["task_id"] for r in page["items"]] == [failed, ok]
        assert page["next_cursor"] is None
        only = client.get("/tasks", params={"status": ["failed", "cancelled"]}).json()
        assert [r["task_id"] for r in only["items"]] == [failed]
        first = client.get("/tasks", params={"limit": 1}).json()
        second = client.get("/tasks", params={"limit": 1, "cursor": first["next_cursor"]}).json()
        assert [r["task_id"] for r in first["items"] + second["items"]] == [failed, ok]
        since = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
        assert client.get("/tasks", params={"since": since}).json()["items"] == []
        assert (
            client.get("/tasks", params={"name": f"{__name__}.boom"}).json()["items"][0]["task_id"]
            == failed
        )
        assert client.get("/tasks", params={"status": "finished"}).status_code == 422
        assert client.get("/tasks", params={"limit": 0}).status_code == 422
        bad_cursor = client.get("/tasks", params={"cursor": "zzz"})
        assert bad_cursor.status_code == 400
        assert "next_cursor" in bad_cursor.json()["detail"]
        stats = client.get("/tasks/stats", params={"window": 60}).json()
        assert stats["total"]["statuses"]["failed"] == 1
        assert stats["tasks"][f"{__name__}.noop"]["statuses"]["done"] == 1
        assert client.get("/tasks/stats", params={"window": 0}).status_code == 422
        assert client.get(f"/tasks/{ok}").json()["status"] == "done"
        assert client.post(f"/tasks/{ok}/cancel").status_code in (404, 405)  # not allowed


def test_the_console_routes_answer_503_until_the_lifespan_runs(anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    client = TestClient(console_app(tracker, allow_cancel=True), backend=anyio_backend)
    for response in (
        client.get("/tasks"),
        client.get("/tasks/stats"),
        client.post(f"/tasks/{'a' * 32}/cancel", headers={"X-Requested-With": "test"}),
    ):
        assert response.status_code == 503
        assert "tracker.install(app)" in response.json()["detail"]


def test_the_cancel_route(anyio_backend: Backend) -> None:
    tracker = TaskTracker(detach=True)
    gates: list[Gate] = []  # built on the loop (older anyio makes events there only)
    app = console_app(tracker, allow_cancel=True)

    @app.post("/slow")
    async def slow(background: BackgroundTasks) -> dict[str, str]:
        gates.append(Gate())
        return {"task_id": background.add_task(gates[-1]).task_id}

    with TestClient(app, backend=anyio_backend) as client:
        task_id = client.post("/slow").json()["task_id"]
        assert client.portal is not None
        client.portal.call(gates[0].running.wait)
        # A cross-site form could send this one: refused.
        form = client.post(
            f"/tasks/{task_id}/cancel",
            content="x=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 403
        assert "X-Requested-With" in form.json()["detail"]
        assert client.get(f"/tasks/{task_id}").json()["status"] == "running"
        accepted = client.post(f"/tasks/{task_id}/cancel", json={})
        assert accepted.status_code == 202
        assert accepted.json() == {"task_id": task_id, "detail": "Cancellation requested"}
        assert client.get(f"/tasks/{task_id}").json()["status"] == "cancelled"
        again = client.post(f"/tasks/{task_id}/cancel", headers={"X-Requested-With": "x"})
        assert again.status_code == 409
        unknown = client.post(f"/tasks/{'b' * 32}/cancel", headers={"X-Requested-With": "x"})
        assert unknown.status_code == 404
        malformed = client.post("/tasks/nope/cancel", headers={"X-Requested-With": "x"})
        assert malformed.status_code == 404


def test_openapi_types_every_console_route() -> None:
    tracker = TaskTracker()
    app = FastAPI()
    app.include_router(tracker.router("/tasks", allow_cancel=True))
    paths = app.openapi()["paths"]

    def schema(path: str, method: str, status: str) -> Any:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]

    assert schema("/tasks", "get", "200") == {"$ref": "#/components/schemas/TaskPage"}
    assert schema("/tasks/stats", "get", "200") == {"$ref": "#/components/schemas/TaskStats"}
    assert schema("/tasks/{task_id}/cancel", "post", "202") == {
        "$ref": "#/components/schemas/CancelAccepted"
    }
    assert set(paths["/tasks/{task_id}/cancel"]["post"]["responses"]) >= {"403", "404", "409"}
    parameters = {p["name"]: p for p in paths["/tasks"]["get"]["parameters"]}
    assert set(parameters) == {"status", "name", "since", "limit", "cursor"}


# Privacy


def test_no_argument_nor_message_anywhere_unless_the_app_opts_in(anyio_backend: Backend) -> None:
    for expose in (False, True):
        store = MemoryStore()
        tracker = TaskTracker(store=store, expose_errors=expose)
        with TestClient(console_app(tracker), backend=anyio_backend) as client:
            failed = client.post("/work?fail=true").json()["task_id"]
            record = client.get(f"/tasks/{failed}").json()
            listed = client.get("/tasks").json()["items"][0]
            stats = client.get("/tasks/stats").text
        (written,) = store.records.values()
        for shown in (record, listed, written):
            assert shown["error"] == "ValueError"  # the type, always
            assert SECRET not in str(shown)  # the argument, never
            assert shown.get("error_message") == (MESSAGE if expose else None)
        assert SECRET not in stats
        assert MESSAGE not in stats


# The dashboard's routes (the page in a real browser: tests/test_dashboard_browser.py)


def dashboard_app(tracker: TaskTracker, **dashboard: Any) -> FastAPI:
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    basic = HTTPBasic()

    def operator(credentials: HTTPBasicCredentials = Depends(basic)) -> None:  # noqa: B008
        if (credentials.username, credentials.password) != ("ops", "pass"):
            raise HTTPException(status_code=401, headers={"WWW-Authenticate": "Basic"})

    app = console_app(tracker)  # the router at /tasks, included first
    app.include_router(tracker.dashboard(dependencies=[Depends(operator)], **dashboard))
    return app


def events_scope(query: bytes = b"") -> dict[str, Any]:
    """A GET of the dashboard's event stream, with the operator's credentials."""
    path = "/tasks/dashboard/events"
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"authorization", b"Basic b3BzOnBhc3M=")],  # ops:pass
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def first_events(app: Any, query: bytes = b"") -> str:
    """What the event stream sends until its first snapshot, over
    raw ASGI; then the client goes away."""
    received: list[bytes] = []
    snapshot = anyio.Event()
    scope = events_scope(query)
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await snapshot.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        received.append(message.get("body", b""))
        if b"event: snapshot" in message.get("body", b""):
            snapshot.set()

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            group.start_soon(app, scope, receive, send)
            await snapshot.wait()
            await anyio.sleep(0.05)
            group.cancel_scope.cancel()  # a stream ends when its client goes away
    return b"".join(received).decode()


def test_the_dashboard_page_is_self_contained_and_behind_the_dependencies(
    anyio_backend: Backend,
) -> None:
    tracker = TaskTracker()
    with TestClient(dashboard_app(tracker), backend=anyio_backend) as client:
        for path in ("/tasks/dashboard", "/tasks/dashboard/events"):
            assert client.get(path).status_code == 401
            assert client.get(path, auth=("ops", "wrong")).status_code == 401
        refused = client.post(f"/tasks/dashboard/tasks/{'a' * 32}/cancel", json={})
        assert refused.status_code == 401
        page = client.get("/tasks/dashboard", auth=("ops", "pass"))
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "connect-src 'self'" in policy
        assert "http://" not in page.text  # no CDN, nothing from elsewhere
        assert "https://" not in page.text
        assert '{"cancel": false}' in page.text
        # The router's routes beside it still answer (an id, not "dashboard").
        task_id = client.post("/work").json()["task_id"]
        assert client.get(f"/tasks/{task_id}").json()["status"] == "done"
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/tasks", "/tasks/stats"}
        assert "/tasks/dashboard" not in client.get("/openapi.json").json()["paths"]


async def test_the_event_stream_sends_stats_and_the_recent_tasks() -> None:
    tracker = TaskTracker()
    app = dashboard_app(tracker, refresh=0.05)
    async with tracker.lifespan(app) as state:
        _, failed = await run(state, noop, boom)
        text = await first_events(app, b"status=failed")
    assert text.startswith("retry: 50\n\n")
    data = next(
        line.removeprefix("data: ")
        for line in text.splitlines()
        if line.startswith("data: ") and '"stats"' in line
    )
    snapshot = json.loads(data)
    assert snapshot["stats"]["total"]["statuses"]["done"] == 1
    assert [r["task_id"] for r in snapshot["page"]["items"]] == [failed.task_id]
    assert SECRET not in text
    assert MESSAGE not in text


async def test_the_event_stream_says_so_when_the_tracker_does_not_serve() -> None:
    tracker = TaskTracker()
    app = dashboard_app(tracker)
    received: list[bytes] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep(DEADLINE)
        return {"type": "http.disconnect"}  # pragma: no cover

    async def send(message: MutableMapping[str, Any]) -> None:
        received.append(message.get("body", b""))

    with anyio.fail_after(DEADLINE):
        await app(events_scope(), receive, send)  # the stream ends at once
    text = b"".join(received).decode()
    assert "event: problem" in text
    assert "not serving" in text


def test_the_dashboard_cancels_when_allowed(anyio_backend: Backend) -> None:
    tracker = TaskTracker(detach=True)
    gates: list[Gate] = []  # built on the loop (older anyio makes events there only)
    app = dashboard_app(tracker, allow_cancel=True)

    @app.post("/slow")
    async def slow(background: BackgroundTasks) -> dict[str, str]:
        gates.append(Gate())
        return {"task_id": background.add_task(gates[-1]).task_id}

    with TestClient(app, backend=anyio_backend) as client:
        assert '{"cancel": true}' in client.get("/tasks/dashboard", auth=("ops", "pass")).text
        task_id = client.post("/slow").json()["task_id"]
        assert client.portal is not None
        client.portal.call(gates[0].running.wait)
        url = f"/tasks/dashboard/tasks/{task_id}/cancel"
        form = client.post(url, data={"x": "1"}, auth=("ops", "pass"))
        assert form.status_code == 403
        sent = client.post(url, headers={"X-Requested-With": "dashboard"}, auth=("ops", "pass"))
        assert sent.status_code == 202
        assert client.get(f"/tasks/{task_id}").json()["status"] == "cancelled"


def test_the_dashboard_follows_the_router_on_cancel(anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.dashboard())
    off = TestClient(app, backend=anyio_backend)
    assert '{"cancel": false}' in off.get("/tasks/dashboard").text
    refused = off.post(f"/tasks/dashboard/tasks/{'a' * 32}/cancel", json={})
    assert refused.status_code == 403
    assert "allow_cancel=True" in refused.json()["detail"]
    app.include_router(tracker.router("/tasks", allow_cancel=True))
    assert '{"cancel": true}' in off.get("/tasks/dashboard").text
    never = FastAPI()
    never.include_router(tracker.dashboard("/ops", allow_cancel=False))
    assert TestClient(never).post(f"/ops/tasks/{'a' * 32}/cancel", json={}).status_code == 404


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"prefix": "tasks"}, "prefix must start with '/'"),
        ({"prefix": "/tasks/"}, "prefix must start with '/'"),
        ({"refresh": 0}, "refresh must be a number of seconds > 0"),
        ({"window": float("inf")}, "window must be a number of seconds > 0"),
        ({"allow_cancel": "yes"}, "allow_cancel must be True, False or None"),
    ],
)
def test_dashboard_refuses_bad_arguments(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskTracker().dashboard(**arguments)


# Edges


def test_console_options_refuse_what_is_not_a_bool() -> None:
    with pytest.raises(ValueError, match="expose_errors must be True or False"):
        TaskTracker(expose_errors="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allow_cancel must be True or False"):
        TaskTracker().router("/tasks", allow_cancel=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream_seconds must be a number of seconds > 0"):
        TaskTracker().dashboard(stream_seconds=-1)


async def test_each_process_shows_messages_by_its_own_choice() -> None:
    store = MemoryStore()
    shows, hides = TaskTracker(store=store, expose_errors=True), TaskTracker(store=store)
    async with shows.lifespan(None) as state, hides.lifespan(None) as hides_state:
        (failed,) = await run(state, boom)
        started = time.monotonic()
        while (await hides.lookup(failed.task_id)) is None:
            assert time.monotonic() - started < DEADLINE
            await anyio.sleep(0.02)
        assert (await shows.lookup(failed.task_id) or {})["error_message"] == MESSAGE
        assert "error_message" not in (await hides.lookup(failed.task_id) or {})
        assert "error_message" not in (await hides.list())["items"][0]
        # What `hides` writes holds no message, whoever reads it.
        (hidden,) = await run(hides_state, boom)
        started = time.monotonic()
        while (await shows.lookup(hidden.task_id)) is None:
            assert time.monotonic() - started < DEADLINE
            await anyio.sleep(0.02)
        assert (await shows.list())["items"][0]["task_id"] == hidden.task_id
        assert "error_message" not in (await shows.list())["items"][0]


async def test_a_record_without_an_owner_is_lost_and_a_taskiq_workers_is_not_cancelled() -> None:
    store = MemoryStore()
    now = datetime.now(timezone.utc).isoformat()
    base = {
        "name": "app.job",
        "status": "running",
        "created_at": now,
        "started_at": now,
        "finished_at": None,
        "duration_s": None,
        "error": None,
        "attempts": 1,
    }
    await store.renew_lease("taskiq-0123", 60.0)
    await store.put(
        [
            {**base, "task_id": "1" * 32},  # no owner: nobody renews it
            {**base, "task_id": "2" * 32, "owner": "taskiq-0123"},
        ],
        history_ttl=None,
    )
    tracker = TaskTracker(store=store)
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router("/tasks", allow_cancel=True))
    with TestClient(app) as client:
        assert client.get(f"/tasks/{'1' * 32}").json()["status"] == "lost"
        assert client.get(f"/tasks/{'2' * 32}").json()["status"] == "running"
        refused = client.post(f"/tasks/{'2' * 32}/cancel", headers={"X-Requested-With": "x"})
        assert refused.status_code == 409
        assert "taskiq worker" in refused.json()["detail"]
        lost = client.post(f"/tasks/{'1' * 32}/cancel", headers={"X-Requested-With": "x"})
        assert lost.status_code == 409
        assert lost.json()["detail"] == "The task has already ended lost"


def test_a_store_that_cannot_list_answers_501_saying_what_it_lacks() -> None:
    class LookupsOnly(MemoryStore):
        query = None  # type: ignore[assignment]

    tracker = TaskTracker(store=LookupsOnly())
    with TestClient(console_app(tracker)) as client:
        response = client.get("/tasks")
        assert response.status_code == 501
        assert "ConsoleStore" in response.json()["detail"]
        assert client.get("/tasks/stats").status_code == 501


def test_the_status_route_builds_its_own_url(anyio_backend: Backend) -> None:
    tracker = TaskTracker()
    app = console_app(tracker)

    @app.post("/linked")
    async def linked(background: BackgroundTasks) -> dict[str, str]:
        handle = background.add_task(noop)
        return {"status_url": app.url_path_for("task_status", task_id=handle.task_id)}

    with TestClient(app, backend=anyio_backend) as client:
        url = client.post("/linked").json()["status_url"]
        assert client.get(url).json()["status"] == "done"


async def test_stats_say_when_the_window_held_more_than_they_read() -> None:
    tracker = TaskTracker(history_size=20_000)
    async with tracker.lifespan(None) as state:
        for _ in range(11):
            await run(state, *[noop] * 1000)
        stats = await tracker.stats()
    assert stats["complete"] is False
    assert stats["total"]["count"] == 10_000  # the newest


async def test_cancel_twice_reports_once_and_a_direct_cancel_of_an_ended_task_does_nothing() -> (
    None
):
    tracker = TaskTracker()
    gate = Gate()
    heard: list[str] = []

    def abandoned(sender: Any, task_id: str, **kwargs: Any) -> None:
        heard.append(task_id)

    with signals.task_abandoned.connected_to(abandoned):
        async with tracker.lifespan(None) as state:
            tasks = collection(state)
            handle = tasks.add_task(gate)
            after = tasks.add_task(noop)
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.run)
                await gate.running.wait()
                assert await tracker.cancel(handle.task_id)
                assert await tracker.cancel(handle.task_id)  # still unwinding: the same cut
            tasks.cancel_task(handle, "again")  # ended: nothing happens
            tasks.cancel_task(after, "again")
    assert heard == [handle.task_id]
    assert after.status == "done"


async def test_a_shutdown_while_one_task_is_being_cut_off_ends_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = TaskTracker(drain_timeout=0, shutdown_grace=DEADLINE)
    running, unwinding, release = anyio.Event(), anyio.Event(), anyio.Event()

    async def slow_to_stop() -> None:
        running.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                unwinding.set()
                await release.wait()

    async def release_soon() -> None:
        await anyio.sleep(0.2)
        release.set()

    # The app shuts down (drain_timeout=0) while `first` is being cut off.
    async with anyio.create_task_group() as group, tracker.lifespan(None) as state:
        tasks = collection(state)
        first = tasks.add_task(slow_to_stop)
        rest = [tasks.add_task(noop), tasks.add_task(noop)]
        group.start_soon(tasks.run)
        await running.wait()
        assert await tracker.cancel(first.task_id, reason="by the operator")
        await unwinding.wait()
        group.start_soon(release_soon)
    assert first.status == "cancelled"
    assert [handle.status for handle in rest] == ["cancelled", "cancelled"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for handle in rest:
        assert any(handle.task_id in w and "drain_timeout" in w for w in warnings)


async def test_an_event_stream_ends_on_its_own_and_says_when_the_store_fails() -> None:
    class Failing(MemoryStore):
        failing = False

        async def query(self, **filters: Any) -> list[dict[str, Any]]:
            if self.failing:
                raise ConnectionError("the store is down")
            return await super().query(**filters)

    store = Failing()
    tracker = TaskTracker(store=store)
    app = dashboard_app(tracker, refresh=0.05, stream_seconds=0.3)
    async with tracker.lifespan(app):
        store.failing = True
        received: list[bytes] = []

        async def receive() -> dict[str, Any]:
            await anyio.sleep(DEADLINE)
            return {"type": "http.disconnect"}  # pragma: no cover

        async def send(message: MutableMapping[str, Any]) -> None:
            received.append(message.get("body", b""))

        with anyio.fail_after(DEADLINE):
            await app(events_scope(), receive, send)  # ends after stream_seconds
    text = b"".join(received).decode()
    assert text.count("event: problem") >= 2
    assert "The task store is unavailable; retrying" in text
    assert "the store is down" not in text
