"""What differs between asyncio and trio, behind one small interface.

`Loop` is the event loop a tracker serves on, captured at its startup: it
runs bookkeeping handed over from worker threads, starts detached runs and
receivers nobody waits for, and makes the `Cutoff` of each tracked run.
A `Cutoff` is how the drain cuts one run off, in the idiom of asyncio's
``timeouts.py``: the run's task is recorded, cancelled only when asked,
and that cancellation (and no other) is taken back when the run unwinds.
On trio, a native cancel scope does the same.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, Protocol

__all__ = ["Cutoff", "Loop", "current_library"]

logger = logging.getLogger("fastapi_bgplus")


def current_library() -> Literal["asyncio", "trio"] | None:
    """The event loop library running this thread, or `None` (a worker thread).

    What `sniffio` answers for the two backends anyio supports, without
    depending on it; trio is looked for only once something has imported it.
    """
    trio = sys.modules.get("trio")
    if trio is not None:  # pragma: no branch  (the test session always has trio imported)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "asyncio"


class Cutoff(Protocol):
    """Wraps one run (``with cutoff:``) so that `cancel()` can cut it off."""

    def __enter__(self) -> None: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Swallow the cancellation `cancel()` caused, and only that one."""

    def cancel(self) -> None:
        """Cancel the run inside, now or as soon as it enters."""


class _AsyncioCutoff:
    __slots__ = ("_cancelled", "_task")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    def __enter__(self) -> None:
        self._task = asyncio.current_task()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        task, self._task = self._task, None
        if not (self._cancelled and exc_type and issubclass(exc_type, asyncio.CancelledError)):
            return False
        uncancel = getattr(task, "uncancel", None)  # Python >= 3.11 (task: the run's, entered)
        # Swallowed unless someone else cancelled the task as well.
        return uncancel is None or uncancel() == 0

    def cancel(self) -> None:
        # Called once, while the run is inside (see `TrackedBackgroundTasks.cancel`).
        self._cancelled = True
        if self._task is not None:  # pragma: no branch
            self._task.cancel()


class _TrioCutoff:
    __slots__ = ("_scope",)

    def __init__(self) -> None:
        import trio

        self._scope = trio.CancelScope()

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self._scope.__exit__(exc_type, exc, tb))

    def cancel(self) -> None:
        self._scope.cancel()


class Loop:
    """The event loop running now (asyncio's or trio's): build it on the loop."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.library = current_library()
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references, as asyncio asks
        if self.library == "trio":
            import trio

            token = trio.lowlevel.current_trio_token()
            self._call_soon: Callable[..., object] = token.run_sync_soon
            self.new_cutoff: Callable[[], Cutoff] = _TrioCutoff
        else:
            self._loop = asyncio.get_running_loop()
            self._call_soon = self._loop.call_soon_threadsafe
            self.new_cutoff = _AsyncioCutoff

    def run(self, func: Callable[..., None], *args: Any) -> None:
        """Call `func(*args)` on the loop: now, if this is its thread; else as
        soon as the loop gets to it, in order, without waiting for it."""
        if threading.get_ident() == self.thread:
            func(*args)
            return
        try:
            self._call_soon(func, *args)
        except RuntimeError:  # the loop has closed: nothing iterates the books any more
            func(*args)

    def spawn(self, func: Callable[[], Awaitable[Any]]) -> None:
        """Start `func()` in a task of its own, in a copy of the current context,
        that nothing waits for: a detached run, or an async receiver of a
        signal sent from synchronous code. Call it on the loop."""
        if self.library == "trio":
            import trio

            trio.lowlevel.spawn_system_task(_awaited, func, context=contextvars.copy_context())
        else:
            task = self._loop.create_task(_awaited(func))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _awaited(func: Callable[[], Awaitable[Any]]) -> None:
    try:
        await func()
    except Exception:  # pragma: no cover  (runs and deliveries catch their own)
        logger.exception("A background coroutine of fastapi_bgplus raised")
