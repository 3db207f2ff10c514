"""One request over raw ASGI, as a server sends it, with the lifespan's state."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


async def request(
    app: Any, state: Mapping[str, Any], path: str, method: str = "POST"
) -> tuple[int, Any]:
    """Send one request; returns once the ASGI call has returned, with the
    status and the JSON body (or the text, if it is not JSON)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": dict(state),
    }
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in messages[1:])
    try:
        return messages[0]["status"], json.loads(body)
    except ValueError:
        return messages[0]["status"], body.decode()
