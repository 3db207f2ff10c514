"""The README's quick start runs exactly as written, and answers what it shows."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Literal

import pytest
from fastapi.testclient import TestClient

README = Path(__file__).parent.parent / "README.md"


def quick_start() -> str:
    section = README.read_text().split("\n## Quick start\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_stays_a_landing_page() -> None:
    assert len(README.read_text()) <= 10_000


def test_the_quick_start_runs_and_answers_what_the_readme_shows(
    tmp_path: Path, anyio_backend: Literal["asyncio", "trio"], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "main.py").write_text(quick_start())
    spec = importlib.util.spec_from_file_location("main", tmp_path / "main.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "main", module)
    spec.loader.exec_module(module)
    shown = README.read_text().split("\n## Quick start\n", 1)[1]
    with TestClient(module.app, backend=anyio_backend) as client:
        created = client.post("/users", params={"email": "ada@example.com"})
        assert created.status_code == 201
        task_id = created.json()["task_id"]
        record = client.get(f"/tasks/{task_id}").json()
    assert re.fullmatch(r"[0-9a-f]{32}", task_id)
    assert record["name"] == "main.send_welcome_email"
    assert record["status"] == "done"
    for key in record:
        assert f'"{key}":' in shown, key  # the README shows every field


def test_the_docs_home_page_is_the_readme() -> None:
    """docs/index.md is the README with its links made relative to docs/ (update
    both together)."""
    index = (README.parent / "docs" / "index.md").read_text()
    expected = README.read_text().replace("(docs/", "(")
    changelog = "https://github.com/fastapi-bgplus/fastapi-bgplus/blob/main/CHANGELOG.md"
    assert index == expected.replace("(CHANGELOG.md)", f"({changelog})")


def test_the_version_is_the_latest_release_of_the_changelog() -> None:
    import re

    import fastapi_bgplus

    changelog = (README.parent / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert releases, "no dated release in CHANGELOG.md"
    assert fastapi_bgplus.__version__ == releases[0]
