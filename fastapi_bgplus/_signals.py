from __future__ import annotations

import inspect
import logging
from typing import Any

from blinker import Signal

logger = logging.getLogger("fastapi_bgplus")


async def send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Call each receiver of `signal` for `sender`, awaiting the async ones.

    Unlike `Signal.send()`, a receiver that raises is logged and skipped, so
    neither the other receivers nor the task itself can be harmed by it.
    Callers test `signal.receivers` first: with nobody listening, sending
    must cost next to nothing.
    """
    for receiver in signal.receivers_for(sender):
        try:
            result = receiver(sender, **kwargs)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "Receiver %s of signal %r raised; it was skipped",
                getattr(receiver, "__qualname__", repr(receiver)),
                getattr(signal, "name", signal),
            )
