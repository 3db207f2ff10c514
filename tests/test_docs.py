"""Every Python block of the README and of docs/ runs (issue 28), in order,
page by page, and every app a page defines starts, stops and serves its
OpenAPI schema through a `TestClient` (`tests/docs_blocks.py` says how).
The taskiq page's Redis is the session's `redis-server`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import NEEDS_TASKIQ_REDIS_1_1
from .docs_blocks import blocks
from .redis_server import RedisServer

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_pages_have_python_blocks() -> None:
    assert sum(len(blocks(page)) for page in PAGES) >= 25


def marked(page: Path) -> object:
    """The taskiq page needs a taskiq-redis that imports (the floor cell's does not)."""
    if "taskiq_redis" in page.read_text():
        return pytest.param(page, marks=NEEDS_TASKIQ_REDIS_1_1, id=page.name)
    return pytest.param(page, id=page.name)


@pytest.mark.parametrize("page", [marked(p) for p in PAGES if blocks(p)])
def test_every_block_runs(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    command = [sys.executable, "-m", "tests.docs_blocks", str(page), str(tmp_path)]
    if "redis://localhost:6379/0" in page.read_text():
        server: RedisServer = request.getfixturevalue("redis_server")
        command.append(server.url)
    log = tmp_path / "output.log"
    with log.open("wb") as output:
        ran = subprocess.run(
            command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, timeout=120, check=False
        )
    assert ran.returncode == 0, log.read_text()[-4000:]
    assert f"{page.name}: {len(blocks(page))} block(s) ran" in log.read_text()
