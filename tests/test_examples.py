from __future__ import annotations

from typing import Literal

import pytest
from starlette.testclient import TestClient

from examples import app as example

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


@NEEDS_TASKIQ_REDIS_1_1  # the worker example uses RedisStreamBroker
def test_the_taskiq_examples_import_and_wire_the_middleware() -> None:
    # Run for real against Redis in tests/test_taskiq_redis.py.
    from examples import taskiq_app, taskiq_worker
    from fastapi_bgplus.taskiq import TrackingMiddleware

    paths = {getattr(route, "path", None) for route in taskiq_app.app.routes}
    assert {"/users", "/tasks/{task_id}"} <= paths
    assert any(isinstance(m, TrackingMiddleware) for m in taskiq_worker.broker.middlewares)
