"""The tracker's routes: a task's record, the list, the stats, cancel."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor

from ._console import MAX_PAGE
from ._exceptions import NotServing

if TYPE_CHECKING:
    from ._tracker import TaskTracker

__all__ = [
    "TaskNotFound",
    "TaskRecord",
    "answer",
    "cancel_task",
    "refuse_cross_site",
    "status_router",
]

T = TypeVar("T")

Status = Literal["pending", "running", "done", "failed", "cancelled", "lost"]


class TaskIdConvertor(Convertor[str]):
    """A path segment that is a task id (32 hex digits, either case), so that
    ``{prefix}/{task_id}`` never shadows a route beside it, such as the
    dashboard's ``/tasks/dashboard``. Starlette's own way to add a
    convertor, under a name of this package's."""

    # Not before a newline: Starlette's ``$`` would match there.
    regex = "[0-9a-fA-F]{32}(?!\n)"

    def convert(self, value: str) -> str:
        return value.lower()  # ids are lowercase; the uppercase spelling is accepted

    def to_string(self, value: str) -> str:
        return value


TASK_ID = "bgplus_task_id"
register_url_convertor(TASK_ID, TaskIdConvertor())


class TaskRecord(BaseModel):
    """A background task's status, as `TaskHandle.to_dict()` gives it.

    It never holds the task's arguments or its exception's message. Clients
    should accept keys they do not know: later versions add some.
    """

    task_id: str = Field(
        description="The task's id: 32 lowercase hexadecimal characters.",
        examples=["3f2a9c0e5b7d41e8a6c2f0b19d4e7a53"],
    )
    name: str = Field(
        description="The task's function, as `module.qualname`.",
        examples=["app.emails.send_welcome"],
    )
    status: Status = Field(
        description=(
            "`pending` (queued), `running`, then `done` or `failed`; `cancelled` if it"
            " was abandoned (the request failed, or it was cut off at shutdown);"
            " `lost` if the process running it stopped without reporting an end."
        ),
    )
    created_at: datetime = Field(description="When it was queued (UTC, ISO 8601).")
    started_at: datetime | None = Field(description="When it started (UTC), if it has.")
    finished_at: datetime | None = Field(description="When it ended (UTC), if it has.")
    duration_s: float | None = Field(
        description="Seconds it ran, from a monotonic clock; null until it ends."
    )
    error: str | None = Field(
        description="The exception's class name if it failed (never its message).",
        examples=[None, "TimeoutError"],
    )
    attempts: int = Field(description="How many times it started (retries count).")
    error_message: str | None = Field(
        default=None,
        description=(
            "The exception's message (its first 500 characters), only if the app"
            " opted in with `TaskTracker(expose_errors=True)`; absent otherwise."
        ),
    )


class TaskPage(BaseModel):
    """A page of task records, newest first."""

    items: list[TaskRecord]
    next_cursor: str | None = Field(
        description="Pass it as `cursor` for the next page; null on the last page."
    )


class TaskSummary(BaseModel):
    """Counts and durations of some tasks over the window."""

    count: int = Field(description="Tasks queued in the window.")
    statuses: dict[Status, int] = Field(description="How many of them are in each status.")
    in_flight: int = Field(description="Tasks pending or running now, whenever queued.")
    p50_s: float | None = Field(description="Median duration of those that ran to an end.")
    p95_s: float | None = Field(description="95th percentile duration of those.")
    failure_rate: float | None = Field(description="failed / (done + failed); null if none.")


class TaskStats(BaseModel):
    """`TaskTracker.stats()`: in total and per task name."""

    window_s: float = Field(description="Seconds looked back.")
    complete: bool = Field(
        description="Whether every task of the window was counted (at most 10,000 are)."
    )
    total: TaskSummary
    tasks: dict[str, TaskSummary] = Field(description="By task name (`module.qualname`).")


class CancelAccepted(BaseModel):
    """The task will end `cancelled` (within about a second in another process)."""

    task_id: str
    detail: str = Field(examples=["Cancellation requested"])


class TaskNotFound(BaseModel):
    """The answer to an unknown, expired or malformed task id."""

    detail: str = Field(examples=["Unknown task id"])


class Problem(BaseModel):
    """A refusal: the detail says why."""

    detail: str


class Unavailable(BaseModel):
    """The answer when the task store cannot answer in time, or the tracker's
    lifespan is not running (the detail says how to install it)."""

    detail: str = Field(examples=["Task store unavailable"])


async def answer(call: Awaitable[T]) -> T:
    """Await a tracker call for a route, with its failures as HTTP errors:
    400 for a bad argument, 501 for a store that cannot list, 503 when the
    tracker is not serving (saying how to install it) or the store cannot
    answer in time (not logged per request: the store's writer warns, once
    per window)."""
    try:
        return await call
    except NotServing as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    except NotImplementedError as exc:  # a store without the console's methods
        raise HTTPException(status_code=501, detail=str(exc)) from exc
    except Exception as exc:
        raise HTTPException(status_code=503, detail="Task store unavailable") from exc


def refuse_cross_site(request: Request) -> None:
    """Refuse what a cross-site form can send: a state-changing console
    request must carry ``X-Requested-With`` (any value) or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if "x-requested-with" not in request.headers and content_type != "application/json":
        raise HTTPException(
            status_code=403,
            detail=(
                "Refused: send this request with an X-Requested-With header (any value)"
                " or a JSON body (Content-Type: application/json), as the dashboard does;"
                " a cross-site form can send neither"
            ),
        )


async def cancel_task(tracker: TaskTracker, task_id: str, request: Request) -> dict[str, Any]:
    """The cancel route's answer: 202, 404 unknown, 409 finished (or in a
    taskiq worker), 403 a cross-site form."""
    refuse_cross_site(request)
    record = await answer(tracker.lookup(task_id))
    if record is None:
        raise HTTPException(status_code=404, detail="Unknown task id")
    if record["status"] not in ("pending", "running"):
        raise HTTPException(
            status_code=409, detail=f"The task has already ended {record['status']}"
        )
    if not await answer(tracker.cancel(task_id, reason=CANCEL_REASON)):
        raise HTTPException(
            status_code=409,
            detail="The task cannot be cancelled: it ended meanwhile, or runs in a taskiq worker",
        )
    return {"task_id": record["task_id"], "detail": "Cancellation requested"}


CANCEL_REASON = "cancelled from the console"

STATUS_404 = {"model": TaskNotFound, "description": "Unknown, expired or malformed task id."}
STATUS_503 = {"model": Unavailable, "description": "The store or the tracker is not there."}
STATUS_400 = {"model": Problem, "description": "A query parameter out of range."}


def status_router(
    tracker: TaskTracker, prefix: str = "", *, allow_cancel: bool = False, **kwargs: Any
) -> APIRouter:
    """The routes of `TaskTracker.router()` (see there). Records are served
    as they are (keys this version does not know included); the models
    document them in OpenAPI."""
    router = APIRouter(prefix=prefix, **kwargs)

    @router.get(
        "" if prefix else "/",
        summary="Background tasks, newest first",
        response_model=None,
        responses={
            200: {"model": TaskPage, "description": "A page of task records."},
            400: STATUS_400,
            503: STATUS_503,
        },
    )
    async def list_tasks(
        status: Annotated[
            list[Status] | None, Query(description="Only these statuses (repeatable).")
        ] = None,
        name: Annotated[str | None, Query(description="Only this task name.")] = None,
        since: Annotated[
            datetime | None, Query(description="Only tasks queued at or after (UTC if naive).")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Records per page.")] = 50,
        cursor: Annotated[
            str | None, Query(description="The `next_cursor` of the previous page.")
        ] = None,
    ) -> dict[str, Any]:
        return await answer(
            tracker.list(status=status, name=name, since=since, limit=limit, cursor=cursor)
        )

    @router.get(
        "/stats",
        summary="Counts and durations of the background tasks",
        response_model=None,
        responses={
            200: {"model": TaskStats, "description": "In total and per task name."},
            400: STATUS_400,
            503: STATUS_503,
        },
    )
    async def task_stats(
        window: Annotated[float, Query(gt=0, description="Seconds to look back.")] = 3600.0,
    ) -> dict[str, Any]:
        return await answer(tracker.stats(window))

    @router.get(
        f"/{{task_id:{TASK_ID}}}",
        summary="Status of a background task",
        response_model=None,
        responses={
            200: {"model": TaskRecord, "description": "The task's status."},
            404: STATUS_404,
            503: STATUS_503,
        },
    )
    async def task_status(
        task_id: Annotated[str, Path(description="The id `add_task()`'s handle gave.")],
    ) -> dict[str, Any]:
        record = await answer(tracker.lookup(task_id))
        if record is None:
            raise HTTPException(status_code=404, detail="Unknown task id")
        return record

    if allow_cancel:

        @router.post(
            f"/{{task_id:{TASK_ID}}}/cancel",
            summary="Cancel a pending or running background task",
            status_code=202,
            response_model=CancelAccepted,
            responses={
                403: {"model": Problem, "description": "Sent as a cross-site form could."},
                404: STATUS_404,
                409: {"model": Problem, "description": "It has already ended."},
                503: STATUS_503,
            },
        )
        async def cancel(
            task_id: Annotated[str, Path(description="The id `add_task()`'s handle gave.")],
            request: Request,
        ) -> dict[str, Any]:
            return await cancel_task(tracker, task_id, request)

    return router
