from __future__ import annotations

from collections.abc import AsyncIterator
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
    response's own background. If the endpoint raises, the tasks do not run:
    each ends cancelled, with a `task_abandoned` signal and a log line.
    """
    tasks = TrackedBackgroundTasks()
    tasks.app = connection.scope.get("app")
    tracker = tracker_of(connection.scope)
    if tracker is not None:
        tasks._tracker = tracker
    fastapi_tasks.add_task(tasks.run)
    try:
        yield tasks
    except BaseException as exc:
        if tasks.tasks and not tasks._started:
            with anyio.CancelScope(shield=True):
                reason = f"the request failed with {type(exc).__name__} before its tasks ran"
                await tasks._abandon(0, reason)
        raise
    if tasks.tasks and not tasks._started:
        # The endpoint returned a response with its own background, which
        # FastAPI ran instead of ours: ours run now, never dropped.
        await tasks.run()


BackgroundTasks = Annotated[TrackedBackgroundTasks, Depends(get_background_tasks)]
"""The request's background tasks: annotate a parameter with it, or call it.

As a parameter of an endpoint or dependency, it receives the request's
`TrackedBackgroundTasks` (one per request). Called, ``BackgroundTasks()``
builds a new collection, for ``Response(..., background=...)``.
"""
