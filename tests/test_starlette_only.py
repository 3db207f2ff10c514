"""`import fastapi_bgplus` works with Starlette alone (issue 2).

Run in a fresh interpreter where `fastapi` cannot be imported, as on an
install without the `[fastapi]` extra.
"""

from __future__ import annotations

from ._subprocess import run_python

SCRIPT = """
    import sys

    try:
        import fastapi
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("fastapi is still importable")

    import fastapi_bgplus
    from fastapi_bgplus import BackgroundTasks, TrackedBackgroundTasks, signals
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    assert BackgroundTasks is TrackedBackgroundTasks
    assert "get_background_tasks" not in fastapi_bgplus.__all__
    assert not any(name.split(".")[0] == "fastapi" for name in sys.modules)

    done = []
    heard = []
    signals.task_completed.connect(lambda sender, **kw: heard.append(sender), weak=False)

    def endpoint(request):
        tasks = BackgroundTasks(tasks=[BackgroundTask(done.append, "by constructor")])
        handle = tasks.add_task(done.append, "by add_task")
        done.append(handle)
        return PlainTextResponse("ok", background=tasks)

    app = Starlette(routes=[Route("/", endpoint)])
    with TestClient(app) as client:
        assert client.get("/").text == "ok"
    handle, *ran = done
    assert ran == ["by constructor", "by add_task"], ran
    assert handle.status == "done", handle
    assert heard == [None, None], heard
    print("starlette-only ok")
"""


def test_import_and_run_without_fastapi() -> None:
    assert run_python(SCRIPT, without=["fastapi"]) == "starlette-only ok"
