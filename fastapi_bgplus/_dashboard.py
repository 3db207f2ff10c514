"""`TaskTracker.dashboard()`: one self-contained page, live over server-sent events."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from ._exceptions import NotServing
from ._router import TASK_ID, CancelAccepted, Problem, Status, cancel_task

if TYPE_CHECKING:
    from ._tracker import TaskTracker

__all__ = ["dashboard_router"]


PAGE_SIZE = 100
"""Recent tasks the dashboard's table shows."""


def dashboard_router(
    tracker: TaskTracker,
    prefix: str,
    allow_cancel: bool | None,
    *,
    refresh: float = 2.0,
    window: float = 3600.0,
    stream_seconds: float = 30.0,
    **kwargs: Any,
) -> APIRouter:
    """The routes of `TaskTracker.dashboard()` (see there)."""
    for name, value in (
        ("refresh", refresh),
        ("window", window),
        ("stream_seconds", stream_seconds),
    ):
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not 0 < value < math.inf
        ):
            raise ValueError(f"{name} must be a number of seconds > 0, finite; got {value!r}")
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(
            f"prefix must start with '/' and not end with one, such as '/tasks/dashboard';"
            f" got {prefix!r}"
        )
    router = APIRouter(prefix=prefix, **kwargs)
    template = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")

    def cancel_allowed() -> bool:
        return tracker.cancel_allowed if allow_cancel is None else allow_cancel

    @router.get("", include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        config = json.dumps({"cancel": cancel_allowed()}).replace("<", "\\u003c")
        page = template.replace("__NONCE__", nonce).replace("__CONFIG__", config)
        return HTMLResponse(
            page,
            headers={
                # Nothing but this app: no CDN, no outside request, no framing.
                "Content-Security-Policy": (
                    f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
                    " connect-src 'self'; img-src 'self' data:; base-uri 'none';"
                    " form-action 'none'; frame-ancestors 'none'"
                ),
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @router.get("/events", include_in_schema=False)
    async def dashboard_events(
        status: Annotated[list[Status] | None, Query()] = None,
        name: Annotated[str | None, Query()] = None,
    ) -> StreamingResponse:
        return StreamingResponse(
            _events(tracker, status, name, refresh, window, stream_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    if allow_cancel is not False:

        @router.post(
            f"/tasks/{{task_id:{TASK_ID}}}/cancel",
            status_code=202,
            response_model=CancelAccepted,
            include_in_schema=False,
            responses={403: {"model": Problem}},
        )
        async def dashboard_cancel(task_id: Annotated[str, Path()], request: Request) -> Any:
            if not cancel_allowed():
                raise HTTPException(
                    status_code=403,
                    detail="Cancel is not allowed: pass allow_cancel=True to dashboard()"
                    " or to router()",
                )
            return await cancel_task(tracker, task_id, request)

    return router


async def _events(
    tracker: TaskTracker,
    status: list[Status] | None,
    name: str | None,
    refresh: float,
    window: float,
    stream_seconds: float,
) -> AsyncIterator[str]:
    """A snapshot (stats and the recent tasks) every `refresh` seconds, for
    `stream_seconds`; a ``problem`` event while the tracker cannot answer."""
    yield f"retry: {int(refresh * 1000)}\n\n"
    deadline = anyio.current_time() + stream_seconds
    while anyio.current_time() < deadline:
        try:
            snapshot = {
                "at": datetime.now(timezone.utc).isoformat(),
                "stats": await tracker.stats(window),
                "page": await tracker.list(status=status, name=name, limit=PAGE_SIZE),
            }
        except NotServing:
            yield _event("problem", {"detail": "The application is not serving its tasks now"})
            return
        except Exception:
            yield _event("problem", {"detail": "The task store is unavailable; retrying"})
        else:
            yield _event("snapshot", snapshot)
        await anyio.sleep(refresh)


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
