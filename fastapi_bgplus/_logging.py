from __future__ import annotations

import logging

from ._handle import current_task

__all__ = ["TaskContextFilter"]


class TaskContextFilter(logging.Filter):
    """A `logging.Filter` that sets ``record.task_id`` and ``record.task_name``
    to those of the background task running (`current_task()`), or `None`
    outside a task, so that JSON formatters and log shippers can group a
    task's lines. It never drops a record.

    Add it to a handler (or a logger)::

        handler.addFilter(TaskContextFilter())
        handler.setFormatter(logging.Formatter("%(task_id)s %(task_name)s %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        handle = current_task()
        record.task_id = handle.task_id if handle is not None else None
        record.task_name = handle.name if handle is not None else None
        return True
