"""OpenTelemetry stays optional (issue 12).

In fresh interpreters: one where it cannot be imported (nor FastAPI 0.165,
which needs it), as on an install without it; one where it is installed but
nothing else imports it, where `fastapi_bgplus` must not import it either.
"""

from __future__ import annotations

import textwrap

import pytest

from ._subprocess import run_python

RUN = textwrap.dedent(
    """
    import sys

    from fastapi_bgplus import TrackedBackgroundTasks
    from fastapi_bgplus._tracing import extract_context, inject_context
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    done = []

    def endpoint(request):
        tasks = TrackedBackgroundTasks.for_request(request)
        done.append(tasks.add_task(lambda: None))
        return PlainTextResponse("ok", background=tasks)

    with TestClient(Starlette(routes=[Route("/", endpoint)])) as client:
        assert client.get("/").text == "ok"
    assert done[0].status == "done", done
    """
)


@pytest.mark.parametrize(
    ("blocked", "check"),
    [
        pytest.param(
            ["opentelemetry", "fastapi"],
            """
            assert inject_context() == {}
            traceparent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
            assert extract_context({"traceparent": traceparent}) is None
            """,
            id="not-installed",
        ),
        pytest.param(
            ["fastapi"],
            """
            assert not [name for name in sys.modules if name.startswith("opentelemetry")]
            """,
            id="installed-unused",
        ),
    ],
)
def test_tasks_run_and_opentelemetry_is_never_imported(blocked: list[str], check: str) -> None:
    script = RUN + textwrap.dedent(check) + 'print("ok")\n'
    assert run_python(script, without=blocked) == "ok"
