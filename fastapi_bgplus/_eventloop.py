from __future__ import annotations

import asyncio
import sys
from typing import Literal

__all__ = ["current_library"]


def current_library() -> Literal["asyncio", "trio"] | None:
    """The event loop library running this thread, or `None` (a worker thread).

    What `sniffio` answers for the two backends anyio supports, without
    depending on it (anyio no longer does); trio is looked for only once
    something has imported it.
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
