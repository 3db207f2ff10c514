from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from starlette.testclient import TestClient

from examples import app as example
from fastapi_bgplus import SQLiteStore

from .conftest import NEEDS_TASKIQ_REDIS_1_1


@pytest.fixture
def client(anyio_backend: Literal["asyncio", "trio"]) -> TestClient:
    return TestClient(example.app, backend=anyio_backend)


def test_sign_up_runs_every_task_and_isolates_the_failing_webhook(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    sent_before = len(example.mailer.sent)
    failures_before = example.failures["examples.app.notify_crm"]
    with client:
        response = client.post("/users", json={"email": "ada@example.com"})
        assert response.status_code == 201
        ids = response.json()["tasks"]

        statuses = {
            kind: client.get(f"/tasks/{task_id}").json()["status"] for kind, task_id in ids.items()
        }
        stats = client.get("/stats").json()

    assert statuses == {"welcome_email": "done", "audit": "done", "crm_webhook": "failed"}
    assert example.mailer.sent[sent_before:] == ["ada@example.com"]
    assert example.audit.entries[-1].endswith("signed up")
    assert example.failures["examples.app.notify_crm"] == failures_before + 1
    assert stats["failures"]["examples.app.notify_crm"] == failures_before + 1
    assert stats["in_flight"] == []
    # The failure is logged with its id, and never with the e-mail address.
    assert ids["crm_webhook"] in caplog.text
    assert "ada@example.com" not in caplog.text


def test_sign_up_refuses_a_malformed_address(client: TestClient) -> None:
    with client:
        assert client.post("/users", json={"email": "not-an-address"}).status_code == 422


def test_unknown_task_id_is_404(client: TestClient) -> None:
    with client:
        assert client.get(f"/tasks/{'0' * 32}").status_code == 404


def test_a_task_store_is_opt_in_through_the_environment(tmp_path: Path) -> None:
    assert example.tracker.store is None  # BGPLUS_STORE is not set under the tests
    assert example.store_from_url("") is None
    store = example.store_from_url(f"sqlite://{tmp_path}/tasks.db")
    assert isinstance(store, SQLiteStore)
    assert store.path == f"{tmp_path}/tasks.db"
    with pytest.raises(ValueError, match=r"use sqlite:///path/to/tasks\.db or redis://"):
        example.store_from_url("postgres://localhost/tasks")


WORKER = """
import json, os, sys
os.environ["BGPLUS_STORE"] = sys.argv[1]
from starlette.testclient import TestClient
from examples.app import app
with TestClient(app) as client:
    if sys.argv[2] == "sign-up":
        print(json.dumps(client.post("/users", json={"email": "ada@example.com"}).json()))
    else:
        ids = json.loads(sys.argv[2]).items()
        print(json.dumps({kind: client.get(f"/tasks/{i}").json()["status"] for kind, i in ids}))
"""


def test_the_example_app_shares_its_tasks_through_sqlite(tmp_path: Path) -> None:
    """Two processes of the app (two workers) on one database: the second
    answers for the tasks of the first."""

    def worker(*args: str) -> Any:
        command = [sys.executable, "-c", WORKER, f"sqlite://{tmp_path}/tasks.db", *args]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads(done.stdout)

    ids = worker("sign-up")["tasks"]
    assert worker(json.dumps(ids)) == {
        "welcome_email": "done",
        "audit": "done",
        "crm_webhook": "failed",
    }


@NEEDS_TASKIQ_REDIS_1_1  # the worker example uses RedisStreamBroker
def test_the_taskiq_examples_import_and_wire_the_middleware() -> None:
    # Run for real against Redis in tests/test_taskiq_redis.py.
    from examples import taskiq_app, taskiq_worker
    from fastapi_bgplus.taskiq import TrackingMiddleware

    # From OpenAPI: an included router's routes are not all in `app.routes`
    # on every FastAPI version.
    paths = set(taskiq_app.app.openapi()["paths"])
    assert {"/users", "/tasks/{task_id}"} <= paths
    assert any(isinstance(m, TrackingMiddleware) for m in taskiq_worker.broker.middlewares)
