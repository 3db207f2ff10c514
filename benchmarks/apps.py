"""The application that `per_request.py` and `starvation.py` serve; not run by hand.

One FastAPI app, with the `TaskTracker` lifespan on, as a user of fastapi-bgplus
would run it.

Per request (the same realistic endpoint in several variants): ``POST /plain``
queues nothing, ``POST /fastapi`` queues one no-op async task through
`fastapi.BackgroundTasks`, ``POST /floor`` does the same and takes one plain
dependency besides, ``POST /bgplus`` queues it through
`fastapi_bgplus.BackgroundTasks`. Each validates a small JSON order with
Pydantic and answers a JSON receipt. ``POST /untracked`` is the bgplus one with
its collection not bound to the tracker: what tracking costs (the shipped
provider in an app without the lifespan hook costs more, see
`untracked_provider`). ``POST /least`` queues it in `_least.LeastTracked`, the least a tracked
collection does per task: a floor of ``/bgplus``. With
``BGPLUS_BENCH_ONLY=<variant>`` the app has only that variant's route, first
(see `VARIANTS`).

Starvation: ``POST /block/fastapi`` and ``POST /block/bgplus`` queue one blocking
sync task (``time.sleep``) each; ``GET /ping`` is a plain ``def`` endpoint, run
in anyio's default thread pool like every ``def`` endpoint.

``GET /stats`` (async, so never starved) counts the tasks that have run and the
blocking ones not yet finished.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import fastapi
from _least import LeastTracked, least_provider
from _models import Order
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import HTTPConnection

import fastapi_bgplus
from fastapi_bgplus import TrackedBackgroundTasks

# per_request.py's "sqlite" variant: a second server whose tracker has a store.
_sqlite = os.environ.get("BGPLUS_BENCH_SQLITE")
tracker = fastapi_bgplus.TaskTracker(
    store=fastapi_bgplus.SQLiteStore(_sqlite) if _sqlite else None,
    history_size=int(os.environ.get("BGPLUS_BENCH_HISTORY", fastapi_bgplus.DEFAULT_HISTORY_SIZE)),
)
app = FastAPI(lifespan=tracker.lifespan)

_order_ids = itertools.count(1)
_ran: dict[str, int] = {"fastapi": 0, "bgplus": 0, "untracked": 0, "least": 0, "blocking": 0}
_unfinished = 0  # blocking tasks queued and not yet finished
_lock = threading.Lock()


class Receipt(BaseModel):
    order_id: int
    items: int
    total: float


def receipt(order: Order) -> Receipt:
    total = sum(item.quantity * item.unit_price for item in order.items)
    return Receipt(order_id=next(_order_ids), items=len(order.items), total=round(total, 2))


async def after_fastapi(order_id: int) -> None:
    _ran["fastapi"] += 1


async def after_bgplus(order_id: int) -> None:
    _ran["bgplus"] += 1


async def plain(order: Order) -> Receipt:
    return receipt(order)


async def with_fastapi(order: Order, tasks: fastapi.BackgroundTasks) -> Receipt:
    result = receipt(order)
    tasks.add_task(after_fastapi, result.order_id)
    return result


async def one_plain_dependency() -> int:
    return 1


async def with_floor(
    order: Order,
    tasks: fastapi.BackgroundTasks,
    _: Annotated[int, Depends(one_plain_dependency)],
) -> Receipt:
    """`/fastapi` plus one plain dependency: the floor of any Depends provider."""
    result = receipt(order)
    tasks.add_task(after_fastapi, result.order_id)
    return result


async def with_bgplus(order: Order, tasks: fastapi_bgplus.BackgroundTasks) -> Receipt:
    result = receipt(order)
    tasks.add_task(after_bgplus, result.order_id)
    return result


async def after_untracked(order_id: int) -> None:
    _ran["untracked"] += 1


async def untracked_provider(connection: HTTPConnection) -> TrackedBackgroundTasks:
    """The shipped provider's mechanism with a collection bound to no tracker:
    what tracking costs. (On a route with no `yield` dependency, as here, the
    shipped provider puts the collection on the request's exit stack at once.)
    In an app without the `TaskTracker` lifespan, the shipped provider also
    looks up the app's binding and checks for a recording span at every
    request: about 1.4 us more in process than this (fifth pass)."""
    tasks = TrackedBackgroundTasks()
    connection.scope["fastapi_inner_astack"].push_async_exit(tasks)
    return tasks


Untracked = Annotated[TrackedBackgroundTasks, Depends(untracked_provider)]


async def with_untracked(order: Order, tasks: Untracked) -> Receipt:
    result = receipt(order)
    tasks.add_task(after_untracked, result.order_id)
    return result


FromLeastProvider = Annotated[LeastTracked, Depends(least_provider)]


async def with_least(order: Order, tasks: FromLeastProvider) -> Receipt:
    """`/bgplus` with the least tracked collection (`_least.py`): a floor."""
    result = receipt(order)
    tasks.add_task(after_least, result.order_id)
    return result


async def after_least(order_id: int) -> None:
    _ran["least"] += 1


# The variants of the endpoint, each at ``/{variant}``. `per_request.py` serves
# each on a server of its own (``BGPLUS_BENCH_ONLY``) where it is the first
# route: Starlette tries routes in order, and each failed match costs about
# 2 us, which would otherwise favour the variants registered first.
VARIANTS = {
    "plain": plain,
    "fastapi": with_fastapi,
    "floor": with_floor,
    "bgplus": with_bgplus,
    "untracked": with_untracked,
    "least": with_least,
}
_only = os.environ.get("BGPLUS_BENCH_ONLY")
for _name, _endpoint in VARIANTS.items():
    if _only in (None, _name):
        app.post(f"/{_name}")(_endpoint)


def block(seconds: float) -> None:
    global _unfinished
    try:
        time.sleep(seconds)
    finally:
        with _lock:
            _unfinished -= 1
            _ran["blocking"] += 1


def queue_block(tasks: StarletteBackgroundTasks, seconds: float) -> None:
    global _unfinished
    with _lock:
        _unfinished += 1
    tasks.add_task(block, seconds)


@app.post("/block/fastapi")
async def block_fastapi(tasks: fastapi.BackgroundTasks, seconds: float = 1.0) -> None:
    queue_block(tasks, seconds)


@app.post("/block/bgplus")
async def block_bgplus(tasks: fastapi_bgplus.BackgroundTasks, seconds: float = 1.0) -> None:
    queue_block(tasks, seconds)


@app.get("/ping")
def ping() -> dict[str, bool]:
    return {"pong": True}


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {"ran": _ran, "unfinished": _unfinished, "in_flight": len(tracker.in_flight)}


# In-process breakdown (``per_request.py --in-process``): the same endpoint,
# one app and one route per mechanism, so that no route pays for another.


async def noop(order_id: int) -> None:
    return None


async def plain_dependency() -> int:
    return 1


async def yield_dependency() -> AsyncIterator[int]:
    yield 1


async def plain_provider(
    connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
) -> TrackedBackgroundTasks:
    """Our collection from a plain dependency, run by FastAPI's own background
    tasks (the 0.1 mechanism), without exit hooks."""
    tasks = TrackedBackgroundTasks.for_request(connection)
    fastapi_tasks.add_task(tasks.run)
    return tasks


async def yield_provider(
    connection: HTTPConnection, fastapi_tasks: fastapi.BackgroundTasks
) -> AsyncIterator[TrackedBackgroundTasks]:
    """The same from a ``yield`` dependency (the mechanism before 0.1.0's change)."""
    yield await plain_provider(connection, fastapi_tasks)


async def starlette_provider(connection: HTTPConnection) -> StarletteBackgroundTasks:
    """The shipped provider's mechanism (a plain dependency, the collection run
    from the request's exit stack) around Starlette's bare collection: the
    floor of that mechanism, the cost of everything but the collection."""
    tasks = StarletteBackgroundTasks()
    connection.scope["fastapi_inner_astack"].push_async_callback(tasks)
    return tasks


async def starlette_provider_deferred(connection: HTTPConnection) -> StarletteBackgroundTasks:
    """The same, with the hop the shipped provider takes on a route with a
    `yield` dependency: the collection goes on the request's exit stack only
    once the endpoint has returned, from the function-scoped stack."""
    tasks = StarletteBackgroundTasks()
    scope = connection.scope
    scope["fastapi_function_astack"].callback(
        scope["fastapi_inner_astack"].push_async_callback, tasks
    )
    return tasks


# What the `tasks` parameter of each mechanism's endpoint is (see MECHANISMS).
FromPlainProvider = Annotated[TrackedBackgroundTasks, Depends(plain_provider)]
FromYieldProvider = Annotated[TrackedBackgroundTasks, Depends(yield_provider)]
FromStarletteProvider = Annotated[Any, Depends(starlette_provider)]
FromStarletteProviderDeferred = Annotated[Any, Depends(starlette_provider_deferred)]


# Per mechanism: what the endpoint's `tasks` parameter is, and the dependency
# the route takes besides (the cost of any `Depends`), if any.
MECHANISMS: dict[str, tuple[Any, Any]] = {
    "plain": (None, None),
    "fastapi": (fastapi.BackgroundTasks, None),
    "fastapi + any plain dependency": (fastapi.BackgroundTasks, plain_dependency),
    "fastapi + any yield dependency": (fastapi.BackgroundTasks, yield_dependency),
    "our collection, plain dependency": (FromPlainProvider, None),
    "our collection, yield dependency": (FromYieldProvider, None),
    "Starlette's collection, the shipped provider's mechanism": (FromStarletteProvider, None),
    "the same, with the hop of a route with a yield dependency": (
        FromStarletteProviderDeferred,
        None,
    ),
    "the least tracked collection, the same mechanism (a floor)": (FromLeastProvider, None),
    "fastapi_bgplus.BackgroundTasks": (fastapi_bgplus.BackgroundTasks, None),
    "fastapi_bgplus.BackgroundTasks, tracker off": (Untracked, None),
}


def mechanism_app(mechanism: str) -> FastAPI:
    """An app whose one route, ``POST /x``, queues a no-op through `mechanism`."""
    tasks_type, besides = MECHANISMS[mechanism]
    one = FastAPI()
    if tasks_type is None:

        @one.post("/x")
        async def no_task(order: Order) -> Receipt:
            return receipt(order)

        return one

    async def with_tasks(order: Order, tasks: Any) -> Receipt:
        result = receipt(order)
        tasks.add_task(noop, result.order_id)
        return result

    # FastAPI reads the parameters' types from the annotations.
    with_tasks.__annotations__ = {"order": Order, "tasks": tasks_type, "return": Receipt}
    one.post("/x", dependencies=[Depends(besides)] if besides else None)(with_tasks)
    return one
