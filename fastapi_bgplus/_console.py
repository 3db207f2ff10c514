"""What the console's answers are made of: records, cursors, filters, stats.

`TaskTracker.list`, `stats` and `cancel` use these; none of it runs on the
request path of the application's own endpoints.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime, timezone
from typing import Any

from ._store import STORED, UNFINISHED, Record, created_of, record_of

__all__ = [
    "MAX_PAGE",
    "STATUSES",
    "decode_cursor",
    "encode_cursor",
    "key_of",
    "record_of",
    "since_seconds",
    "stored_statuses",
    "summarize",
    "wanted_statuses",
]

STATUSES = (*STORED, "lost")
"""Every status a record can answer."""

MAX_PAGE = 1000
"""The most records one page of `TaskTracker.list` holds."""


def key_of(record: Record) -> tuple[float, str]:
    """Where a record stands in a list: newest first, by creation, then id."""
    return (created_of(record), record["task_id"])


def encode_cursor(key: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(text)
        if isinstance(created, (int, float)) and isinstance(task_id, str):
            return (float(created), task_id)
    except (ValueError, TypeError, binascii.Error):
        pass
    raise ValueError(
        f"cursor {cursor!r} is not one a page gave: pass the next_cursor of the"
        f" previous page as it is, or none for the first page"
    )


def wanted_statuses(status: str | Collection[str] | None) -> frozenset[str] | None:
    """The statuses asked for, checked: `None` for all."""
    if status is None:
        return None
    asked = [status] if isinstance(status, str) else list(status)
    unknown = [value for value in asked if value not in STATUSES]
    if unknown or not asked:
        raise ValueError(
            f"status must be one of {', '.join(STATUSES)}, or several of them; got {status!r}"
        )
    return frozenset(asked)


def stored_statuses(wanted: frozenset[str] | None) -> frozenset[str] | None:
    """What to ask the store for: ``lost`` is stored as pending or running."""
    if wanted is None:
        return None
    stored = set(wanted) - {"lost"}
    if "lost" in wanted:
        stored |= UNFINISHED
    return frozenset(stored)


def since_seconds(since: datetime | None) -> float | None:
    """A moment as seconds since the epoch; a naive datetime is taken as UTC."""
    if since is None:
        return None
    if not isinstance(since, datetime):
        raise ValueError(f"since must be a datetime, or None; got {since!r}")
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return since.timestamp()


def percentile(ordered: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted values, or `None` for none."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _summary(records: Iterable[Record], in_flight: int) -> dict[str, Any]:
    counts = dict.fromkeys(STATUSES, 0)
    durations: list[float] = []
    for record in records:
        counts[record["status"]] += 1
        if record["status"] in ("done", "failed") and record["duration_s"] is not None:
            durations.append(record["duration_s"])
    durations.sort()
    ended = counts["done"] + counts["failed"]
    return {
        "count": sum(counts.values()),
        "statuses": counts,
        "in_flight": in_flight,
        "p50_s": percentile(durations, 0.50),
        "p95_s": percentile(durations, 0.95),
        "failure_rate": counts["failed"] / ended if ended else None,
    }


def summarize(
    records: list[Record], in_flight: list[Record], window: float, complete: bool
) -> dict[str, Any]:
    """`TaskTracker.stats()`: the records queued in the window, per task name
    and in total, with the tasks in flight now (of any age)."""
    by_name: defaultdict[str, list[Record]] = defaultdict(list)
    live: defaultdict[str, int] = defaultdict(int)
    for record in records:
        by_name[record["name"]].append(record)
    for record in in_flight:
        live[record["name"]] += 1
        by_name.setdefault(record["name"], [])
    return {
        "window_s": float(window),
        "complete": complete,
        "total": _summary(records, len(in_flight)),
        "tasks": {name: _summary(by_name[name], live[name]) for name in sorted(by_name)},
    }
