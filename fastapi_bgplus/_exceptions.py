from __future__ import annotations

__all__ = ["NotServing", "QueueFull"]


class QueueFull(Exception):
    """`add_task()` on a detached tracker whose queue is full
    (``TaskTracker(detach=True, max_concurrent=N, max_queued=M)``): M requests'
    tasks already wait for one of the N places. Nothing was queued.

    Answer it with 503 and ``Retry-After`` (see the flow-control guide)::

        @app.exception_handler(QueueFull)
        async def busy(request, exc):
            return JSONResponse({"detail": str(exc)}, 503, {"Retry-After": "5"})
    """


class NotServing(RuntimeError):
    """A `TaskTracker`'s lookup (or the status route) was used while its lifespan
    is not running, so it knows no task: install the lifespan."""
