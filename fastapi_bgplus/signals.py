"""Lifecycle signals of background tasks, as blinker signals.

Connect a `def` or `async def` receiver; pass ``sender=app`` to hear only the
tasks of one application::

    from fastapi_bgplus import signals

    @signals.task_failed.connect_via(app)
    def count_failure(sender, **kw):
        failures.inc()

Every signal is sent with the keyword arguments ``handle`` (the `TaskHandle`),
``task_id`` and ``func`` (the task's callable), plus those listed on it below.
A receiver that raises is logged and skipped. Receivers are held by weak
reference unless connected with ``weak=False``, as everywhere in blinker.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = [
    "namespace",
    "task_abandoned",
    "task_completed",
    "task_failed",
    "task_retrying",
    "task_started",
]

namespace = Namespace()
"""The blinker namespace that holds fastapi-bgplus's signals."""

task_started = namespace.signal("task-started", doc="Sent just before a task runs.")
task_completed = namespace.signal(
    "task-completed", doc="Sent after a task returned; adds ``duration_s``."
)
task_failed = namespace.signal(
    "task-failed",
    doc="Sent after a task raised; adds ``duration_s`` and ``error``.",
)
task_abandoned = namespace.signal(
    "task-abandoned",
    doc=(
        "Sent when a task will never run or finish (dropped, cancelled or cut"
        " off at shutdown); adds ``reason``, a sentence saying why."
    ),
)
task_retrying = namespace.signal(
    "task-retrying",
    doc=(
        "Sent before each wait between two attempts of a task with ``attempts=``"
        " (see `fastapi_bgplus.task`); adds ``attempt`` (the attempt that failed,"
        " from 1), ``error`` and ``wait_s``."
    ),
)
