from __future__ import annotations

import anyio
from anyio.lowlevel import RunVar

__all__ = ["DEFAULT_THREAD_LIMIT", "current_thread_limiter"]

DEFAULT_THREAD_LIMIT = 40
"""Worker threads that sync background tasks may use at once, per event loop."""

_limiter: RunVar[anyio.CapacityLimiter] = RunVar("fastapi_bgplus.thread_limiter")


def current_thread_limiter() -> anyio.CapacityLimiter:
    """Return the capacity limiter that sync background tasks run under.

    It is separate from anyio's default limiter, which `def` endpoints and
    dependencies use, so a burst of blocking tasks cannot starve endpoints.
    There is one per event loop, created on first use with
    `DEFAULT_THREAD_LIMIT` tokens; set ``total_tokens`` on it to resize it
    (`TaskTracker(thread_limit=...)` does so at startup).

    Must be called from inside a running event loop.
    """
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DEFAULT_THREAD_LIMIT)
        _limiter.set(limiter)
        return limiter
