from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Annotated

import anyio
import fastapi
import fastapi.params
from fastapi import Depends
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection

from ._tasks import TrackedBackgroundTasks
from ._tracker import tracker_of

__all__ = ["BackgroundTasks", "get_background_tasks"]


# FastAPI >= 0.121 keeps a request-scoped and a function-scoped exit stack in
# the scope (they came with ``Depends(scope=...)``). With them the provider is
# a plain ``async def`` that hooks those stacks; a ``yield`` dependency, which
# older versions need, costs some 25 us more per request (benchmarks/README.md).
_HAS_EXIT_STACKS = hasattr(fastapi.params.Depends(), "scope")


def _new_collection(
    connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
) -> TrackedBackgroundTasks:
    tasks = TrackedBackgroundTasks()
    tasks.app = connection.scope.get("app")
    tasks._tracker = tracker_of(connection.scope)
    fastapi_tasks.add_task(tasks.run)
    return tasks


async def _settle(tasks: TrackedBackgroundTasks, exc: BaseException | None) -> None:
    """At the end of the request: run the collection if FastAPI dropped it, or
    report its tasks lost if the request failed."""
    if tasks._started or not tasks.tasks:
        return  # FastAPI ran it, or there is nothing to account for
    if exc is None:
        # The endpoint returned a response with its own background, which
        # FastAPI ran instead of ours: ours run now, never dropped.
        await tasks.run()
    else:
        with anyio.CancelScope(shield=True):
            reason = f"the request failed with {type(exc).__name__} before its tasks ran"
            await tasks._abandon(reason)


if TYPE_CHECKING or _HAS_EXIT_STACKS:

    async def get_background_tasks(
        connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
    ) -> TrackedBackgroundTasks:
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
        request fails, the tasks do not run: each ends cancelled, with a
        `task_abandoned` signal and a log line.
        """
        tasks = _new_collection(connection, fastapi_tasks)
        request_stack: AsyncExitStack = connection.scope["fastapi_inner_astack"]

        async def settle(
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            await _settle(tasks, exc)

        async def after_endpoint() -> None:
            # Exits unwind last in, first out: pushed once the endpoint has
            # returned, and every dependency has been entered, `settle` runs
            # before any `yield` dependency exits, whatever the parameter order.
            request_stack.push_async_exit(settle)

        connection.scope["fastapi_function_astack"].push_async_callback(after_endpoint)
        return tasks

else:  # pragma: no cover  (FastAPI < 0.121)

    async def get_background_tasks(
        connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
    ) -> AsyncIterator[TrackedBackgroundTasks]:
        """The same provider, as a ``yield`` dependency: older FastAPIs have no exit stacks."""
        tasks = _new_collection(connection, fastapi_tasks)
        try:
            yield tasks
        except BaseException as exc:
            await _settle(tasks, exc)
            raise
        # FastAPI >= 0.118 (which set this key) exits yield dependencies after
        # the response. Before, they exit before it is sent: settling here would
        # run the tasks ahead of the response, so FastAPI's background runs them.
        if "fastapi_inner_astack" in connection.scope:
            await _settle(tasks, None)


class _NewCollection:
    """Stands for `TrackedBackgroundTasks` in the runtime annotation.

    FastAPI before 0.128.2 refuses ``Depends`` on a parameter whose type is a
    Starlette ``BackgroundTasks`` subclass (``AssertionError: Cannot specify
    Depends for type ...``), so the alias must not name the class itself at
    runtime. Called, as the alias is, it builds the real collection.
    """

    __slots__ = ()

    def __new__(  # type: ignore[misc]  # builds a collection, not an instance of this class
        cls, tasks: Sequence[BackgroundTask] | None = None
    ) -> TrackedBackgroundTasks:
        return TrackedBackgroundTasks(tasks)


if TYPE_CHECKING:
    _Collection = TrackedBackgroundTasks
else:
    _Collection = _NewCollection

BackgroundTasks = Annotated[_Collection, Depends(get_background_tasks)]
"""The request's background tasks: annotate a parameter with it, or call it.

As a parameter of an endpoint or dependency, it receives the request's
`TrackedBackgroundTasks` (one per request). Called, ``BackgroundTasks()``
builds a new collection, for ``Response(..., background=...)``.
"""
