"""The status route on its own, and what `/docs` shows of it."""

from __future__ import annotations

from typing import Any, Literal

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_bgplus import MemoryStore, TaskTracker

RECORD_FIELDS = [
    "task_id",
    "name",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "duration_s",
    "error",
    "attempts",
    "error_message",
]


def test_openapi_documents_the_record_and_the_404() -> None:
    app = FastAPI()
    app.include_router(TaskTracker().router(prefix="/tasks"))
    schema = app.openapi()
    responses = schema["paths"]["/tasks/{task_id}"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskRecord"
    }
    assert responses["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskNotFound"
    }
    record = schema["components"]["schemas"]["TaskRecord"]
    assert list(record["properties"]) == RECORD_FIELDS
    assert all(field["description"] for field in record["properties"].values())
    assert record["properties"]["status"]["enum"] == [
        "pending",
        "running",
        "done",
        "failed",
        "cancelled",
        "lost",
    ]
    assert record["properties"]["created_at"]["format"] == "date-time"


@pytest.mark.parametrize("task_id", ["a" * 32, "A" * 32, "a" * 31])
def test_a_lookup_is_asked_only_for_well_formed_ids_and_its_record_served_as_is(
    task_id: str, anyio_backend: Literal["asyncio", "trio"]
) -> None:
    """A record from another process or a later version (status `lost`, an
    key this version does not know) reaches the client unchanged."""
    asked: list[str] = []
    record: dict[str, Any] = {
        "task_id": "a" * 32,
        "name": "app.send",
        "status": "lost",
        "created_at": "2026-01-01T00:00:00+00:00",
        "started_at": None,
        "finished_at": None,
        "duration_s": None,
        "error": None,
        "attempts": 2,
        "shard": "eu-1",
    }

    class Store(MemoryStore):
        async def get(self, task_id: str) -> dict[str, Any] | None:
            asked.append(task_id)
            return await super().get(task_id)

    store = Store()

    async def fill() -> None:
        # Running in a process whose lease has lapsed: `lost`.
        await store.put([{**record, "status": "running", "owner": "1-dead"}], history_ttl=None)

    anyio.run(fill)
    tracker = TaskTracker(store=store)
    app = FastAPI(lifespan=tracker.lifespan)
    app.include_router(tracker.router("/tasks", tags=["tasks"]))
    with TestClient(app, backend=anyio_backend) as client:
        response = client.get(f"/tasks/{task_id}")
    if task_id.lower() == record["task_id"]:  # ids are lowercase; uppercase is accepted
        assert response.status_code == 200
        assert response.json() == record
        assert asked == [record["task_id"]]
    else:
        assert response.status_code == 404  # no route for what is not an id
        assert asked == []
