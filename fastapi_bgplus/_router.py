"""The status route: ``GET {prefix}/{task_id}`` answers a task's record."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

from ._exceptions import NotServing

__all__ = ["TaskNotFound", "TaskRecord", "status_router"]


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
    status: Literal["pending", "running", "done", "failed", "cancelled", "lost"] = Field(
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


class TaskNotFound(BaseModel):
    """The answer to an unknown, expired or malformed task id."""

    detail: str = Field(examples=["Unknown task id"])


class Unavailable(BaseModel):
    """The answer when the task store cannot answer in time, or the tracker's
    lifespan is not running (the detail says how to install it)."""

    detail: str = Field(examples=["Task store unavailable"])


async def answer(lookup: Callable[[str], Awaitable[Any]], task_id: str) -> Any:
    """`lookup(task_id)`, with its failures as HTTP errors: 503 when the
    tracker is not serving (saying how to install it) or the store cannot
    answer in time (not logged per request: the store's writer warns, once
    per window)."""
    try:
        return await lookup(task_id)
    except NotServing as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    except Exception as exc:
        raise HTTPException(status_code=503, detail="Task store unavailable") from exc


def status_router(
    lookup: Callable[[str], Awaitable[dict[str, Any] | None]], prefix: str = "", **kwargs: Any
) -> APIRouter:
    """A FastAPI router serving ``GET {prefix}/{task_id}`` → the task's record.

    `lookup` is awaited with the task id and returns the record, a
    `TaskHandle.to_dict()`, or `None`: `404`. It may raise (`503`, see
    `answer`). The record is served as it is (keys this version does not
    know included); `TaskRecord` documents it in
    OpenAPI. Keyword arguments go to `fastapi.APIRouter` (``tags=``,
    ``dependencies=`` for auth, ...).
    """
    router = APIRouter(prefix=prefix, **kwargs)

    @router.get(
        "/{task_id}",
        summary="Status of a background task",
        response_model=None,
        responses={
            200: {"model": TaskRecord, "description": "The task's status."},
            404: {"model": TaskNotFound, "description": "Unknown, expired or malformed task id."},
            503: {"model": Unavailable, "description": "The store or the tracker is not there."},
        },
    )
    async def task_status(
        task_id: Annotated[str, Path(description="The id `add_task()`'s handle gave.")],
    ) -> dict[str, Any]:
        task_id = task_id.lower()  # ids are lowercase hex; the uppercase spelling is accepted
        well_formed = len(task_id) == 32 and all(c in "0123456789abcdef" for c in task_id)
        record: dict[str, Any] | None = await answer(lookup, task_id) if well_formed else None
        if record is None:
            raise HTTPException(status_code=404, detail="Unknown task id")
        return record

    return router
