"""Drop-in `BackgroundTasks` for FastAPI and Starlette: task ids and status,
per-task error isolation, blinker signals, a dedicated thread limiter and a
lifespan hook that drains tasks at shutdown."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import signals
from ._collection import TrackedBackgroundTasks
from ._exceptions import NotServing, QueueFull
from ._handle import TaskHandle, TaskStatus, current_task
from ._limiter import DEFAULT_THREAD_LIMIT, current_thread_limiter
from ._logging import TaskContextFilter
from ._options import task
from ._report import TaskObserver
from ._store import ConsoleStore, MemoryStore, TaskStore
from ._tracker import DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, TaskTracker

__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "DEFAULT_HISTORY_TTL",
    "DEFAULT_THREAD_LIMIT",
    "BackgroundTasks",
    "ConsoleStore",
    "MemoryStore",
    "NotServing",
    "QueueFull",
    "RedisStore",
    "SQLiteStore",
    "TaskContextFilter",
    "TaskHandle",
    "TaskObserver",
    "TaskStatus",
    "TaskStore",
    "TaskTracker",
    "TrackedBackgroundTasks",
    "current_task",
    "current_thread_limiter",
    "get_background_tasks",
    "signals",
    "task",
]

if TYPE_CHECKING:
    from ._fastapi import BackgroundTasks, get_background_tasks
    from ._store_redis import RedisStore
    from ._store_sqlite import SQLiteStore
else:
    try:
        from ._fastapi import BackgroundTasks, get_background_tasks
    except ModuleNotFoundError as exc:  # pragma: no cover  (tested in a subprocess)
        if exc.name != "fastapi":
            raise
        # Starlette alone: the name still builds collections by hand.
        BackgroundTasks = TrackedBackgroundTasks
        __all__.remove("get_background_tasks")

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # The stores are imported on first use, so that `import fastapi_bgplus`
    # imports neither sqlite3 nor redis (an optional extra).
    if name == "SQLiteStore":
        from ._store_sqlite import SQLiteStore

        globals()["SQLiteStore"] = SQLiteStore
        return SQLiteStore
    if name == "RedisStore":
        try:
            from ._store_redis import RedisStore
        except ModuleNotFoundError as exc:  # pragma: no cover  (tested in a subprocess)
            if exc.name != "redis":
                raise
            raise ModuleNotFoundError(
                "RedisStore needs the redis package: pip install 'fastapi-bgplus[redis]'",
                name="redis",
            ) from exc
        globals()["RedisStore"] = RedisStore
        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
