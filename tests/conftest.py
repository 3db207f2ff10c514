from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Literal, NamedTuple, Protocol

import anyio
import fastapi
import httpx2
import pytest
from blinker import ANY, Signal
from fastapi.testclient import TestClient
from starlette.types import ASGIApp

from fastapi_bgplus import signals
from tests.redis_server import redis_server as redis_server
from tests.stores import memory_store as memory_store
from tests.stores import redis_store as redis_store
from tests.stores import sqlite_store as sqlite_store
from tests.stores import store as store  # the store contract suite's fixture

FASTAPI = tuple(int(part) for part in fastapi.__version__.split(".")[:3])
"""The installed FastAPI's version, e.g. ``(0, 128, 2)``, for `skipif` on older
ones; scripts/matrix runs the suite on them."""


def _version(distribution: str) -> tuple[int, ...]:
    return tuple(int(part) for part in metadata.version(distribution).split(".")[:3])


NEEDS_TASKIQ_REDIS_1_1 = pytest.mark.skipif(
    _version("taskiq-redis") < (1, 1),
    reason="taskiq-redis < 1.1 (the last for redis 5, which the floor cell tests) imports"
    " names taskiq 0.13 (the taskiq floor) no longer has, and has no"
    " unacknowledged_lock_timeout",
)
"""For tests that use taskiq-redis: import it inside them, not at module level."""

STRICT_WARNINGS = [
    "-W",
    "error",
    # Starlette < 0.49's TestClient under anyio >= 4.12, as in pyproject.toml.
    "-W",
    "ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning",
]
"""The options of a Python subprocess that treats warnings as errors, as pytest
does here (pyproject.toml's ``filterwarnings``)."""


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
    signals.task_retrying,
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


class Call(Protocol):
    def __call__(
        self, app: ASGIApp, method: str, path: str, *, raise_server_exceptions: bool = True
    ) -> httpx2.Response: ...


@pytest.fixture(params=["testclient", "httpx"])
def call(request: pytest.FixtureRequest, anyio_backend: Literal["asyncio", "trio"]) -> Call:
    """Send one request to an app through the chosen client, on the chosen backend."""
    via: str = request.param

    def call(
        app: ASGIApp, method: str, path: str, *, raise_server_exceptions: bool = True
    ) -> httpx2.Response:
        if via == "testclient":
            with TestClient(
                app, backend=anyio_backend, raise_server_exceptions=raise_server_exceptions
            ) as client:
                return client.request(method, path)

        async def send() -> httpx2.Response:
            transport = httpx2.ASGITransport(app=app, raise_app_exceptions=raise_server_exceptions)
            async with httpx2.AsyncClient(
                transport=transport, base_url="http://testserver"
            ) as client:
                return await client.request(method, path)

        return anyio.run(send, backend=anyio_backend)

    return call
