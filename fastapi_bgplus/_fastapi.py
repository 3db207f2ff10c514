from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Annotated

import anyio
import fastapi
from fastapi import Depends
from starlette.requests import HTTPConnection

from ._tasks import TrackedBackgroundTasks
from ._tracker import tracker_of

__all__ = ["BackgroundTasks", "get_background_tasks"]


async def get_background_tasks(
    connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
) -> AsyncIterator[TrackedBackgroundTasks]:
    """FastAPI dependency that provides the request's `TrackedBackgroundTasks`.

    FastAPI caches it per request, so every parameter that asks for it, in the
    endpoint or in its dependencies, gets the same collection. Spelled out,
    ``Annotated[TrackedBackgroundTasks, Depends(get_background_tasks)]`` is
    what `fastapi_bgplus.BackgroundTasks` means.

    The collection rides in FastAPI's own background tasks, so it runs where
    FastAPI's would: after the response, before the exit of `yield`
    dependencies. If the endpoint returns a response with a background of its
    own, FastAPI drops its tasks; this collection then runs right after the
    response's own background, still before any `yield` dependency exits
    (FastAPI >= 0.121; before that, from this provider's own exit). If the
    endpoint raises, the tasks do not run:
    each ends cancelled, with a `task_abandoned` signal and a log line.
    """
    tasks = TrackedBackgroundTasks()
    tasks.app = connection.scope.get("app")
    tracker = tracker_of(connection.scope)
    if tracker is not None:
        tasks._tracker = tracker
    fastapi_tasks.add_task(tasks.run)
    _run_before_yield_dependencies_exit(connection, tasks)
    try:
        yield tasks
    except BaseException as exc:
        if tasks.tasks and not tasks._started:
            with anyio.CancelScope(shield=True):
                reason = f"the request failed with {type(exc).__name__} before its tasks ran"
                await tasks._abandon(0, reason)
        raise
    if tasks.tasks and not tasks._started:  # pragma: no cover  (FastAPI < 0.121)
        # The endpoint returned a response with its own background, which
        # FastAPI ran instead of ours: ours run now, never dropped.
        await tasks.run()


def _run_before_yield_dependencies_exit(
    connection: HTTPConnection, tasks: TrackedBackgroundTasks
) -> None:
    """When the endpoint returns a response with its own background, run the
    collection right after it, before *any* `yield` dependency exits.

    Our own exit comes too late for the dependencies entered after us (exits
    unwind last-in, first-out), so once the endpoint has returned, and every
    dependency has been entered, a runner goes on top of FastAPI's request
    exit stack. With a FastAPI that has no such stacks, our own exit runs the
    collection instead.
    """
    request_stack = connection.scope.get("fastapi_inner_astack")
    function_stack = connection.scope.get("fastapi_function_astack")
    if not isinstance(request_stack, AsyncExitStack) or not isinstance(
        function_stack, AsyncExitStack
    ):
        return  # pragma: no cover  (FastAPI < 0.121)

    async def run_if_dropped(
        exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and not tasks._started:
            await tasks.run()

    async def after_endpoint() -> None:
        request_stack.push_async_exit(run_if_dropped)

    function_stack.push_async_callback(after_endpoint)


BackgroundTasks = Annotated[TrackedBackgroundTasks, Depends(get_background_tasks)]
"""The request's background tasks: annotate a parameter with it, or call it.

As a parameter of an endpoint or dependency, it receives the request's
`TrackedBackgroundTasks` (one per request). Called, ``BackgroundTasks()``
builds a new collection, for ``Response(..., background=...)``.
"""
