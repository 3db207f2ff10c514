"""A Python script in a fresh interpreter, for what only a new process shows:
what ``import fastapi_bgplus`` imports, and how the package does without an
optional dependency (`test_starlette_only.py`, `test_store_redis.py`,
`test_taskiq.py`, `test_without_opentelemetry.py`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Collection

from ._servers import REPO
from .conftest import STRICT_WARNINGS

TIMEOUT_S = 60

BLOCKER = """\
def _block(blocked):
    import sys

    class Unimportable:
        # Stands for an install without these packages: any import of them fails.
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Unimportable)


_block({blocked!r})
del _block
"""


def run_python(script: str, *, without: Collection[str] = ()) -> str:
    """Run `script` (dedented) from the repository root in a fresh interpreter
    that treats warnings as errors, with the top-level packages named in
    `without` made unimportable first; assert it exits with 0 and return its
    standard output, stripped."""
    assert all("." not in name for name in without), f"top-level packages only: {without}"
    code = textwrap.dedent(script)
    if without:
        code = BLOCKER.format(blocked=tuple(sorted(without))) + code
    result = subprocess.run(
        [sys.executable, *STRICT_WARNINGS, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"exit code {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    )
    return result.stdout.strip()
