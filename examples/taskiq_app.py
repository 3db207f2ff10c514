"""The sign-up service of examples/app.py, with its e-mail sent by taskiq.

The call site is unchanged: ``tasks.add_task(send_welcome_email, address)``.
`send_welcome_email` is a taskiq task now (examples/taskiq_worker.py), so the
handle's id is the taskiq message's, the message is sent after the response
(only if the request succeeded), and a worker runs it. Run, with Redis on
localhost (or ``REDIS_URL`` set)::

    taskiq worker examples.taskiq_worker:broker
    uvicorn examples.taskiq_app:app

    curl -X POST localhost:8000/users -H 'content-type: application/json' \\
         -d '{"email": "ada@example.com"}'
    curl localhost:8000/tasks/<the task id it returned>   # pending, running, done
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import BaseModel, Field

from examples.taskiq_worker import broker, send_welcome_email, store
from fastapi_bgplus import BackgroundTasks, TaskTracker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The app starts and stops its broker, as taskiq's FastAPI docs show.
    if not broker.is_worker_process:
        await broker.startup()
    yield
    if not broker.is_worker_process:
        await broker.shutdown()


tracker = TaskTracker(store=store)
app = FastAPI(lifespan=tracker.wrap(lifespan))
# GET /tasks/{task_id}: this process's task, else the store's record.
app.include_router(tracker.router(prefix="/tasks"))


class SignUp(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")


@app.post("/users", status_code=201)
async def sign_up(body: SignUp, tasks: BackgroundTasks) -> dict[str, str]:
    handle = tasks.add_task(send_welcome_email, body.email)
    return {"task_id": handle.task_id}
