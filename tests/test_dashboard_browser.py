"""The dashboard in a real browser: Playwright driving Debian's chromium
package, against a real uvicorn serving `tests/apps/workers.py` (a
`SQLiteStore`, the console behind HTTP Basic).

Playwright's own browser download needs the internet, so the browser is the
system's (``BGPLUS_CHROMIUM``, by default ``/usr/bin/chromium``). Without it
the test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from ._servers import Server, uvicorn

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("BGPLUS_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery staple"
DEADLINE_MS = 10_000


@pytest.fixture
def chromium() -> str:
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"No browser at {CHROMIUM}: apt-get install -y chromium")
        pytest.skip(f"No browser at {CHROMIUM} (apt-get install -y chromium)")
    pytest.importorskip("playwright")
    return CHROMIUM


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    env = {
        "BGPLUS_STORE": f"sqlite://{tmp_path}/tasks.db",
        "BGPLUS_CONSOLE_PASSWORD": PASSWORD,
    }
    with uvicorn(tmp_path, app="tests.apps.workers:app", env=env) as running:
        yield running


def queue(server: Server, seconds: float, count: int = 1) -> list[str]:
    response = httpx2.post(f"{server.url}/queue", params={"count": count, "seconds": seconds})
    response.raise_for_status()
    ids: list[str] = response.json()
    return ids


def test_the_dashboard_shows_filters_details_updates_live_and_cancels(
    server: Server, chromium: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    done = queue(server, 0.01, count=3)
    failed = httpx2.post(f"{server.url}/fail").json()
    (running,) = queue(server, 60)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            # Without credentials: refused, the event stream too.
            anonymous = browser.new_context()
            for path in ("", "/events"):
                assert anonymous.request.get(f"{server.url}/tasks/dashboard{path}").status == 401
            anonymous.close()

            context = browser.new_context(
                http_credentials={"username": "ops", "password": PASSWORD},
                viewport={"width": 1400, "height": 900},
            )
            page = context.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            expect.set_options(timeout=DEADLINE_MS)
            loaded = page.goto(f"{server.url}/tasks/dashboard")
            assert loaded is not None
            assert loaded.status == 200

            # The counts and the tasks.
            expect(page.get_by_test_id("live")).to_have_text("live")
            expect(page.get_by_test_id("total-done")).to_have_text("3")
            expect(page.get_by_test_id("total-failed")).to_have_text("1")
            expect(page.get_by_test_id("total-in_flight")).to_have_text("1")
            rows = page.get_by_test_id("rows").locator("tr")
            expect(rows).to_have_count(5)
            cards = page.get_by_test_id("per-task")
            expect(cards).to_contain_text("tests.apps.workers.sleep")
            expect(cards).to_contain_text("tests.apps.workers.fail")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            # The status filters.
            page.get_by_role("button", name="Failed").click()
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("failed")
            # A detail: id, name, status, timings, attempts, error type.
            rows.first.click()
            detail = page.get_by_test_id("detail")
            expect(detail.locator('[data-field="id"]')).to_have_text(failed)
            expect(detail.locator('[data-field="error"]')).to_have_text("ValueError")
            expect(detail.locator('[data-field="attempts"]')).to_have_text("1")
            expect(page.get_by_test_id("cancel")).to_be_hidden()  # it has ended
            expect(detail).not_to_contain_text("this task always fails")  # not exposed
            page.get_by_role("button", name="All").click()
            expect(rows).to_have_count(5)

            # The name search: a substring filters the table at once.
            page.get_by_test_id("search").fill("workers.fai")
            expect(rows).to_have_count(1)
            page.get_by_test_id("search").fill("")
            expect(rows).to_have_count(5)

            # Live: a task queued now shows up, without a reload.
            (fresh,) = queue(server, 0.01)
            expect(page.get_by_test_id("total-done")).to_have_text("4")
            expect(page.locator(f'tr[data-task-id="{fresh}"]')).to_contain_text("done")

            # Cancel the running one from its detail panel.
            page.locator(f'tr[data-task-id="{running}"]').click()
            expect(detail.locator('[data-field="status"]')).to_have_text("running")
            page.get_by_test_id("cancel").click()
            expect(detail.locator('[data-field="status"]')).to_have_text("cancelled")
            expect(page.get_by_test_id("total-cancelled")).to_have_text("1")
            assert httpx2.get(f"{server.url}/tasks/{running}").json()["status"] == "cancelled"
            assert all(task_id in page.content() for task_id in done)
            if os.environ.get("BGPLUS_SCREENSHOT"):  # the one in docs/console.md
                page.screenshot(path=os.environ["BGPLUS_SCREENSHOT"], full_page=True)

            # Nothing asked of anyone but the app.
            assert requested, "the page made no request"
            outside = [url for url in requested if not url.startswith(server.url)]
            assert outside == []
            assert any(re.search(r"/tasks/dashboard/events", url) for url in requested)
            assert errors == []
        finally:
            browser.close()
