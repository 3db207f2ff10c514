"""Run every Python block of one Markdown page, as a reader would paste them.

``python -m tests.docs_blocks PAGE DIRECTORY [REDIS_URL]``, from
`tests/test_docs.py`, in a process of its own (the blocks connect signal
receivers and set up logging: nothing leaks into other tests).

The blocks of a page run in order in one namespace, as one session: a later
block may use what an earlier one defined. A block whose first line is
``# name.py`` is that file: it is written to DIRECTORY (the working directory,
on ``sys.path``) and imported as module ``name``, so that later files import
it as the page says. Top-level ``await`` is allowed. Then every application
the page defined is started and stopped through a `TestClient`, and a FastAPI
one serves its OpenAPI schema. With REDIS_URL, the page's
``redis://localhost:6379/0`` is that server instead.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FILE = re.compile(r"# (\w+)\.py\b")


def blocks(page: Path) -> list[tuple[int, str]]:
    """The page's Python blocks, with the line each starts on."""
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def run(page: Path, directory: Path, redis_url: str | None) -> list[Any]:
    os.chdir(directory)
    sys.path.insert(0, str(directory))
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    apps: dict[
        int, Any
    ] = {}  # every app a block defined, in order (a later one may reuse the name)
    for line, code in blocks(page):
        if redis_url is not None:
            code = code.replace("redis://localhost:6379/0", redis_url)
        where = f"{page.name}, the block at line {line}"
        named = FILE.match(code.splitlines()[0])
        if named:
            (directory / f"{named.group(1)}.py").write_text(code)
            module = importlib.import_module(named.group(1))
            namespace.update(vars(module))
        else:
            compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, namespace)
            if inspect.iscoroutine(result):
                asyncio.run(result)
        apps.update({id(value): value for value in namespace.values() if _is_app(value)})
    return list(apps.values())


def _is_app(value: Any) -> bool:
    from starlette.applications import Starlette

    return isinstance(value, Starlette)


def drive(apps: list[Any]) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    for app in apps:
        with TestClient(app) as client:
            if isinstance(app, FastAPI):
                client.get("/openapi.json").raise_for_status()


if __name__ == "__main__":
    page, directory = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    apps = run(page, directory, sys.argv[3] if len(sys.argv) > 3 else None)
    drive(apps)
    print(f"{page.name}: {len(blocks(page))} block(s) ran, {len(apps)} app(s) started")
