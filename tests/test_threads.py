"""The loop owns its books: `def` endpoints and dependencies run in worker
threads and queue tasks there, while the event loop reads the tracker's live
tasks, history and drain. No public call ever sees a structure change under
it, and nothing queued from a thread is lost."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import anyio
import anyio.lowlevel
import pytest
from fastapi import Depends, FastAPI

from fastapi_bgplus import BackgroundTasks, TaskTracker, TrackedBackgroundTasks
from tests.asgi import request

pytestmark = pytest.mark.anyio

ROUNDS = 20  # enough to catch a race that shows once in twenty runs
REQUESTS = 20


def noop() -> None:
    pass


def audited(tasks: BackgroundTasks) -> Iterator[None]:  # a `def` dependency, in a thread
    tasks.add_task(noop)
    yield
    tasks.add_task(noop)  # after the tasks ran: ends cancelled at once, on the loop


def threaded_app(tracker: TaskTracker) -> FastAPI:
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/queue")
    def queue(tasks: BackgroundTasks, _: Annotated[None, Depends(audited)]) -> dict[str, Any]:
        return {"ids": [tasks.add_task(noop).task_id for _ in range(5)]}

    return app


async def test_def_endpoints_queue_tasks_while_the_loop_reads_the_books(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")
    tracker = TaskTracker(history_size=100_000)
    app = threaded_app(tracker)
    reads = 0
    ids: list[str] = []
    state: dict[str, Any] = {}

    async def queue() -> None:
        status, body = await request(app, state, "/queue")
        assert status == 200
        ids.extend(body["ids"])

    with anyio.fail_after(60):
        async with tracker.lifespan(app) as lifespan_state:
            state.update(lifespan_state)
            for _ in range(ROUNDS):
                done = anyio.Event()

                async def read(done: anyio.Event = done) -> None:
                    nonlocal reads
                    while not done.is_set():
                        for handle in tracker.in_flight:
                            assert tracker.get(handle.task_id) is handle
                        repr(tracker)
                        reads += 1
                        await anyio.sleep(0.001)  # a reader at a pace, not a spin

                async with anyio.create_task_group() as group:
                    group.start_soon(read)
                    async with anyio.create_task_group() as requests:
                        for _ in range(REQUESTS):
                            requests.start_soon(queue)
                    done.set()
            await anyio.wait_all_tasks_blocked()
            assert tracker.in_flight == []
    assert reads > ROUNDS
    assert len(ids) == ROUNDS * REQUESTS * 5
    assert all(tracker.get(task_id).status == "done" for task_id in ids)  # type: ignore[union-attr]
    # Each request's dependency queued one more that ran, and one after: abandoned.
    ran, abandoned = ROUNDS * REQUESTS * 6, ROUNDS * REQUESTS
    assert f"since startup: {ran} done, 0 failed, {abandoned} abandoned" in caplog.text


def slow_app(tracker: TaskTracker, queuing: threading.Event, stop: threading.Event) -> FastAPI:
    app = FastAPI(lifespan=tracker.lifespan)

    @app.post("/slow")
    def slow(tasks: BackgroundTasks) -> dict[str, Any]:
        queuing.set()
        while not stop.is_set():
            tasks.add_task(noop)
            time.sleep(0.0005)
        return {}

    return app


async def test_a_shutdown_while_a_def_thread_still_queues_tasks_drains_and_summarises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_bgplus")
    for _ in range(ROUNDS):
        tracker = TaskTracker(drain_timeout=0, shutdown_grace=1)
        queuing, stop = threading.Event(), threading.Event()
        app = slow_app(tracker, queuing, stop)
        shut_down: list[str] = []

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                async with tracker.lifespan(app) as state:
                    group.start_soon(request, app, state, "/slow")
                    await anyio.to_thread.run_sync(queuing.wait)
                    await anyio.sleep(0.01)
                shut_down.append("summary")
                stop.set()
        assert shut_down == ["summary"]
        assert "Background tasks drained in" in caplog.text
        caplog.clear()


async def test_a_thread_the_app_started_itself_queues_late_tasks_without_a_race() -> None:
    tracker = TaskTracker()
    app = FastAPI(lifespan=tracker.lifespan)
    collections: list[TrackedBackgroundTasks] = []

    @app.post("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, Any]:
        collections.append(tasks)
        return {}

    async with tracker.lifespan(app) as state:
        await request(app, state, "/")
        (closed,) = collections
        late: list[Any] = []

        def foreign() -> None:
            for _ in range(200):
                late.append(closed.add_task(noop))

        thread = threading.Thread(target=foreign)
        thread.start()
        for _ in range(200):
            list(tracker.in_flight)
            await anyio.lowlevel.checkpoint()
        await anyio.to_thread.run_sync(thread.join)
        await anyio.wait_all_tasks_blocked()
        assert all(handle.status == "cancelled" for handle in late)
        assert all(tracker.get(handle.task_id) is handle for handle in late)


async def test_a_task_queued_from_a_foreign_thread_that_ends_before_the_loop_hears_of_it() -> None:
    """The thread's hand-over reaches the loop after the task has run and
    ended there: the tracker does not count it in flight for ever."""
    tracker = TaskTracker(drain_timeout=0)
    async with tracker.lifespan(None) as state:
        tasks = TrackedBackgroundTasks.for_request({"type": "http", "state": state})
        handles: list[Any] = []
        thread = threading.Thread(target=lambda: handles.append(tasks.add_task(noop_async)))
        thread.start()
        thread.join()  # on the loop's thread, on purpose: the hand-over waits behind the run
        await tasks.run()
        await anyio.lowlevel.checkpoint()  # now the loop hears of the queuing
        assert handles[0].status == "done"
        assert tracker.in_flight == []
        assert tracker.get(handles[0].task_id) is handles[0]


async def noop_async() -> None:
    pass
