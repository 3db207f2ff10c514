from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from blinker import ANY, Signal

from fastapi_bgplus import signals

from .stores import store  # noqa: F401  # the store contract suite's fixture


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Sent(NamedTuple):
    """One signal as a receiver heard it."""

    signal: str
    sender: Any
    kwargs: dict[str, Any]


SIGNALS = (
    signals.task_started,
    signals.task_completed,
    signals.task_failed,
    signals.task_abandoned,
)


@pytest.fixture
def no_receivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide every receiver of the package's signals for one test, even those an
    imported app connected for good (the example app does)."""
    for signal in SIGNALS:
        monkeypatch.setattr(signal, "receivers", {})


@pytest.fixture
def connect() -> Iterator[Callable[..., None]]:
    """``connect(signal, receiver, sender=ANY)`` for this test only (held strongly)."""
    connected: list[tuple[Signal, Callable[..., Any], Any]] = []

    def connect(signal: Signal, receiver: Callable[..., Any], sender: Any = ANY) -> None:
        signal.connect(receiver, sender=sender, weak=False)
        connected.append((signal, receiver, sender))

    yield connect
    for signal, receiver, sender in connected:
        signal.disconnect(receiver, sender=sender)


@pytest.fixture
def sent(connect: Callable[..., None]) -> list[Sent]:
    """Every signal of `fastapi_bgplus.signals` sent during the test, in order."""
    heard: list[Sent] = []
    for signal in SIGNALS:

        def receiver(
            sender: Any, *, _name: str = signal.name.replace("-", "_"), **kwargs: Any
        ) -> None:
            heard.append(Sent(_name, sender, kwargs))

        connect(signal, receiver)
    return heard
