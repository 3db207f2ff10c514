from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Annotated, Any

import fastapi
import fastapi.params
from fastapi import Depends
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection

from ._identity import Memo, remember
from ._tasks import TrackedBackgroundTasks

__all__ = ["BackgroundTasks", "get_background_tasks"]


# FastAPI >= 0.121 keeps a request-scoped and a function-scoped exit stack in
# the scope (they came with ``Depends(scope=...)``). With them the provider is
# a plain ``async def`` that runs the collection from the request's exit stack;
# older versions need a ``yield`` dependency and FastAPI's own background
# tasks, which cost some 40 us more per request (benchmarks/README.md).
_HAS_EXIT_STACKS = hasattr(fastapi.params.Depends(), "scope")


if TYPE_CHECKING or _HAS_EXIT_STACKS:

    async def get_background_tasks(connection: HTTPConnection) -> TrackedBackgroundTasks:
        """FastAPI dependency that provides the request's `TrackedBackgroundTasks`.

        FastAPI caches it per request, so every parameter that asks for it, in the
        endpoint or in its dependencies, gets the same collection. Spelled out,
        ``Annotated[TrackedBackgroundTasks, Depends(get_background_tasks)]`` is
        what `fastapi_bgplus.BackgroundTasks` means.

        The tasks run where FastAPI's own would: after the response (and after
        its own background, if the endpoint returns a response with one), before
        the exit of `yield` dependencies. If the request fails, they do not run:
        each ends cancelled, with a `task_abandoned` signal and a log line. Then
        the collection is closed (see `TrackedBackgroundTasks.end_request`).
        """
        tasks = TrackedBackgroundTasks.for_request(connection)
        scope = connection.scope
        request_stack: AsyncExitStack = scope["fastapi_inner_astack"]
        # Whether this request may enter a `yield` dependency (its route's, or
        # one from ``app.dependency_overrides``): yes, unless sure it cannot.
        # Inline, as every request asks: a call costs more than the lookup.
        route = scope["route"]  # FastAPI's, which its routes set as they match
        known = _yield_routes.get(id(route))
        if known is None or known[0]() is not route:
            known = remember(_yield_routes, route, _route_may_yield(route))
        # Overrides can come and go (tests set them): read at every request,
        # as FastAPI does when it solves the dependencies.
        if known[1] or (
            (overrides := route.dependency_overrides_provider) and overrides.dependency_overrides
        ):
            # A `yield` dependency entered after this one would put its exit
            # above the collection's on the request's stack. So the collection
            # goes there only once the endpoint has returned (and every
            # dependency has been entered): the function-scoped stack unwinds
            # and pushes it, on top. Last in, first out, it runs there
            # (`end_request`) after the response has been sent and before any
            # `yield` dependency exits, whatever the parameter order.
            scope["fastapi_function_astack"].callback(request_stack.push_async_exit, tasks)
        else:
            # Nothing else this request enters exits after the response: the
            # collection goes on the request's stack now, without the hop.
            request_stack.push_async_exit(tasks)
        return tasks

    # Per route (FastAPI's routes are not hashable): whether it has a `yield`
    # dependency, found once by walking its dependency tree. An app that goes
    # leaves nothing here.
    _yield_routes: Memo[bool] = {}

    def _route_may_yield(route: Any) -> bool:
        dependant = getattr(route, "dependant", None)
        # A websocket route does not say where its overrides come from.
        unknown = dependant is None or not hasattr(route, "dependency_overrides_provider")
        return unknown or _has_generator(dependant)

    def _has_generator(dependant: Any) -> bool:
        """Whether the call of `dependant` (the endpoint, at the top: a
        streaming one uses the request's stack too) or of any of its
        dependencies, at any depth, may be a generator."""
        return _may_be_generator(dependant.call) or any(
            _has_generator(sub) for sub in dependant.dependencies
        )

    def _may_be_generator(call: Any) -> bool:
        """Whether FastAPI could run `call` as a generator: a generator
        function, or a callable whose ``__call__`` is one, behind partials and
        decorators. `True` when in doubt.

        Broader than `add_task`'s check of a task: a class counts by its
        ``__call__`` too (FastAPI before 0.123.6 read a class that way), and
        the function behind a decorator counts (FastAPI since then runs it so).
        """
        while isinstance(call, functools.partial):
            call = call.func
        for candidate in (call, inspect.unwrap(call)):
            for function in (candidate, getattr(candidate, "__call__", None)):  # noqa: B004
                if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
                    return True
        return False

else:  # pragma: no cover  (FastAPI < 0.121)

    async def get_background_tasks(
        connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
    ) -> AsyncIterator[TrackedBackgroundTasks]:
        """The same provider, as a ``yield`` dependency: older FastAPIs have no
        exit stacks. The collection rides in FastAPI's own background tasks, so
        it runs after the response; if FastAPI drops them (a response with its
        own background), it runs from this dependency's exit."""
        tasks = TrackedBackgroundTasks.for_request(connection)
        # Detached mode needs the exit stacks: here the tasks run in the request.
        tasks._spawn = None
        # `end_request`, not `run`: it runs the tasks and closes the collection
        # in one go, so a task added after they ran (from the exit code of a
        # `yield` dependency) ends cancelled at once instead of raising; it
        # runs them only if nothing else has started them.
        fastapi_tasks.add_task(tasks.end_request, None)
        try:
            yield tasks
        except BaseException as exc:
            await tasks.end_request(exc)
            raise
        # FastAPI >= 0.118 (which set this key) exits yield dependencies after
        # the response. Before, they exit before it is sent: settling here would
        # run the tasks ahead of the response, so FastAPI's background runs them.
        # A websocket has no response, and FastAPI never runs its background:
        # its tasks run here, once the endpoint has returned, on every version.
        scope = connection.scope
        if "fastapi_inner_astack" in scope or scope["type"] == "websocket":
            await tasks.end_request(None)


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
