"""Flower's tasks page in a real browser: Debian's chromium, headless, driven by Playwright,
finds the pump's tasks (the page loads its rows by XHR into a DataTable) with the purchase
id in the args column, opens one task's page, and saves the screenshot the README shows
(docs/flower-tasks.png).

Uses the system chromium (``scripts/bootstrap`` installs it with apt); never downloads a
browser. Skipped, saying why, only when /usr/bin/chromium is missing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.flower_stack import PASSWORD, USER, run_purchases_under_flower
from tests.support.stack import ROOT, Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests may run as root in a container, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # loopback only: no update or telemetry traffic
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "flower-tasks.png"
TIMEOUT_MS = 20_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no {CHROMIUM}: install Debian's chromium (scripts/bootstrap does)",
    ),
]


@pytest.mark.timeout(180)
def test_flower_tasks_page_shows_the_pumps_tasks(stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    flower, expected = run_purchases_under_flower(stack, count=3)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 1280, "height": 720},
                http_credentials={"username": USER, "password": PASSWORD},
            )
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{flower.url}/tasks")
            # DataTables gives each row the task's uuid as its id (rowId: 'uuid').
            rows = page.locator("#tasks-table tbody tr[id]")
            expect(rows).to_have_count(len(expected), timeout=TIMEOUT_MS)
            for t in expected:
                row = page.locator(f'#tasks-table tbody tr[id="{t.task_id}"]')
                expect(row).to_contain_text(t.name)
                expect(row).to_contain_text("SUCCESS")
                expect(row).to_contain_text(f'"purchase_id":"{t.purchase_id}"')
            shot = tmp_path / "flower-tasks.png"
            page.screenshot(path=str(shot))

            # The search box finds a purchase's tasks by its id (the README says so).
            first = expected[0]
            page.get_by_role("searchbox").fill(first.purchase_id)
            mine = {t.task_id for t in expected if t.purchase_id == first.purchase_id}
            expect(rows).to_have_count(len(mine))
            assert set(rows.evaluate_all("rows => rows.map(r => r.id)")) == mine

            page.locator(f'#tasks-table tbody tr[id="{first.task_id}"] a[href*="/task/"]').click()
            expect(page).to_have_url(re.compile(re.escape(f"/task/{first.task_id}")))
            expect(page.locator("body")).to_contain_text(first.purchase_id)
            expect(page.locator("body")).to_contain_text("SUCCESS")
        finally:
            browser.close()
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        # The committed picture changes only on request: ids and times differ per run.
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(shot.read_bytes())
