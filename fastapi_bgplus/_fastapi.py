"""FastAPI: the provider of a request's collection, and the alias users import."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection

from ._collection import TrackedBackgroundTasks
from ._handle import queueing

__all__ = ["BackgroundTasks", "get_background_tasks"]


async def get_background_tasks(connection: HTTPConnection) -> TrackedBackgroundTasks:
    """FastAPI dependency that provides the request's `TrackedBackgroundTasks`.

    FastAPI caches it per request, so every parameter that asks for it, in the
    endpoint or in its dependencies, gets the same collection. Spelled out,
    ``Annotated[TrackedBackgroundTasks, Depends(get_background_tasks)]`` is
    what `fastapi_bgplus.BackgroundTasks` means; in tests, replace it with
    ``app.dependency_overrides[get_background_tasks] = ...``.

    The tasks run where FastAPI's own would: after the response (and after
    its own background, if the endpoint returns a response with one), before
    the exit of `yield` dependencies. If the request fails, they do not run:
    each ends cancelled, with a `task_abandoned` signal and a log line. Then
    the collection is closed (see `TrackedBackgroundTasks.end_request`).
    """
    tasks = TrackedBackgroundTasks.for_request(connection)
    queueing.set(tasks)
    scope = connection.scope
    request_stack: AsyncExitStack = scope["fastapi_inner_astack"]
    # FastAPI keeps two exit stacks per request: the function's, which
    # unwinds once the endpoint has returned (after every dependency was
    # entered), and the request's, which unwinds after the response is sent.
    # The collection goes on the request's stack when the function's
    # unwinds, so that it is on top of every `yield` dependency entered
    # there, whatever the parameter order: last in, first out, it runs
    # (`end_request`) after the response and before their exit code.
    scope["fastapi_function_astack"].callback(request_stack.push_async_exit, tasks)
    return tasks


class _NewCollectionType(type):
    """Reads and writes of attributes of the alias's class reach
    `TrackedBackgroundTasks`, so that ``mock.patch.object(BackgroundTasks,
    "add_task")`` patches the collections that requests receive."""

    def __getattr__(cls, name: str) -> Any:
        return getattr(TrackedBackgroundTasks, name)

    def __setattr__(cls, name: str, value: Any) -> None:
        setattr(TrackedBackgroundTasks, name, value)


class _NewCollection(metaclass=_NewCollectionType):
    """fastapi_bgplus.BackgroundTasks: the request's background tasks.

    Annotate an endpoint's or a dependency's parameter with it to receive the
    request's `TrackedBackgroundTasks` (one per request, shared by all who ask):
    ``async def create_user(background_tasks: BackgroundTasks): ...``. Called,
    ``BackgroundTasks()`` builds a new `TrackedBackgroundTasks`, for
    ``Response(..., background=...)``. For ``isinstance`` and subclassing, use
    `TrackedBackgroundTasks`: this name is an ``Annotated`` alias.
    """

    # Why a stand-in class: FastAPI before 0.128.2 refuses ``Depends`` on a
    # parameter whose type is a Starlette ``BackgroundTasks`` subclass
    # ("Cannot specify Depends for type ..."), so the alias must not name the
    # class itself at run time. Called, as the alias is, it builds the real one.

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

# `mock.patch("fastapi_bgplus.BackgroundTasks.add_task")` saves what it finds
# on the alias itself and, on exit, sets it back there (which reaches the
# class); an attribute found only through the alias would be deleted from it
# instead, which a typing alias refuses.
object.__setattr__(BackgroundTasks, "add_task", TrackedBackgroundTasks.add_task)
