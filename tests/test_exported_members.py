from __future__ import annotations

import re
from pathlib import Path

import fastapi_bgplus

README = Path(__file__).parent.parent / "README.md"


def documented_names() -> set[str]:
    api = README.read_text().split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return {
        name
        for line in api.splitlines()
        if line.startswith("- ")
        for name in re.findall(r"`(\w+)`", line.split(":", 1)[0])
    }


def test_all_is_what_the_readme_documents() -> None:
    assert set(fastapi_bgplus.__all__) == documented_names()


def test_every_exported_name_exists() -> None:
    # The order of __all__ is kept by ruff (RUF022).
    for name in fastapi_bgplus.__all__:
        assert getattr(fastapi_bgplus, name) is not None
