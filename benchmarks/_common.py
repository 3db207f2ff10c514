"""Helpers shared by the benchmark scripts: statistics, tables, the machine, servers."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

PACKAGES = ("fastapi", "starlette", "anyio", "blinker", "pydantic", "uvicorn", "h11", "httptools")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rotated(items: Sequence[str], round_no: int) -> list[str]:
    """The variants in a different order each round, so none always goes first."""
    shift = round_no % len(items)
    return [*items[shift:], *items[:shift]]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One paragraph saying what the figures were measured on."""
    packages = ", ".join(f"{name} {version(name)}" for name in PACKAGES)
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), {platform.system()} {platform.release()},"
        f" Python {platform.python_version()} ({sys.implementation.name});"
        f" fastapi-bgplus {version('fastapi-bgplus')}; {packages}"
    )


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def print_header(title: str) -> None:
    print(f"# {title}")
    print(f"machine: {machine()}")
    print(f"load average before the run: {load_average()}")
    print()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, so the output can be pasted into benchmarks/README.md."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


# Servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_implementation() -> str:
    """uvicorn's fastest HTTP/1.1 parser that is installed: httptools, else h11."""
    return "httptools" if version("httptools") != "not installed" else "h11"


def start_uvicorn(
    app: str, port: int, *, cpus: str | None, http: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """One uvicorn worker serving ``benchmarks/<app>`` on 127.0.0.1, ready when
    returned; `env` adds to the server's environment."""
    command = [
        sys.executable, "-m", "uvicorn", app,
        "--app-dir", str(BENCHMARKS),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--http", http, "--loop", "asyncio",
        "--no-access-log", "--log-level", "warning", "--lifespan", "on",
    ]  # fmt: skip
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    environment = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited early with code {process.returncode}")
        try:
            httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return process
        except httpx2.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("uvicorn did not start within 30 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


async def asgi_request(
    app: Any, state: dict[str, Any], method: str, path: str, body: bytes = b""
) -> int:
    """One request to `app` over raw ASGI, as a server sends it, with the
    lifespan's `state`; returns the status code once the ASGI call returned."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": headers if body else [],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "state": dict(state),
    }  # fmt: skip
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    status = 0

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status
