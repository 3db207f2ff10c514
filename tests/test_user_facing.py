"""What a user swapping the import meets (issue 8): the messages they read and
the documented differences from `fastapi.BackgroundTasks`."""

from __future__ import annotations

import pytest
from starlette.background import BackgroundTask

from fastapi_bgplus import BackgroundTasks, TrackedBackgroundTasks


async def send_email(address: str) -> None:
    pass


# A forgotten pair of parentheses: `add_task(send_email(address))`.

COROUTINE_MESSAGE = (
    "add_task() got a coroutine object (send_email(...)) instead of a function; pass the"
    " function and its arguments instead: add_task(send_email, *args, **kwargs)"
)


def test_add_task_names_a_coroutine_object_and_shows_the_fix() -> None:
    tasks = BackgroundTasks()
    with pytest.raises(TypeError) as caught:
        tasks.add_task(send_email("ada@example.com"))  # type: ignore[arg-type]
    assert str(caught.value) == COROUTINE_MESSAGE
    assert tasks.tasks == []


def test_the_constructor_names_a_coroutine_object_too() -> None:
    coroutine = send_email("ada@example.com")
    with pytest.raises(TypeError) as caught:
        TrackedBackgroundTasks(tasks=[BackgroundTask(coroutine)])  # type: ignore[arg-type]
    assert str(caught.value) == COROUTINE_MESSAGE
