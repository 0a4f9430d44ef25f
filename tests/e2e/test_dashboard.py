"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real
gateway, auth, analytics and redis-server. A wrong key is refused with a message; the tenant's
key shows its plan, quota gauges and a chart of the requests the test made; the key stays in
the tab's sessionStorage. `NARTHEX_SCREENSHOTS=1` saves its screenshot as the README's
(docs/dashboard.png); otherwise it goes to the test's temporary folder, leaving the checkout
as it was."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.analytics import UsageStack, mixed_load, usage_stack, wait_for_usage
from tests.support.databases import service_unavailable
from tests.support.platform import ROOT

# Real processes on a small shared machine: minutes, not the default two.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
README_SCREENSHOT = ROOT / "docs" / "dashboard.png"
REQUESTS = 40
UNKNOWN_KEY = "nx_dev_0000000000000000_" + "x" * 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UsageStack]:
    if not os.path.exists(CHROMIUM):
        service_unavailable(f"{CHROMIUM} is missing (apt-get install chromium; make test-tools)")
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server is not installed")
    with usage_stack(tmp_path_factory.mktemp("dashboard")) as s:
        yield s


def test_the_dashboard_shows_plan_gauges_and_usage_and_refuses_a_bad_key(
    stack: UsageStack, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    screenshot = (
        README_SCREENSHOT if os.environ.get("NARTHEX_SCREENSHOTS") else tmp_path / "dashboard.png"
    )

    result = asyncio.run(mixed_load(stack.gateway.url, stack.tenant.headers, REQUESTS, clients=2))
    wait_for_usage(stack.gateway.url, stack.edge.admin_key, stack.tenant.id, result.sent)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(stack.gateway.url + "/dashboard")

            page.fill("#key", UNKNOWN_KEY)
            page.click("#login button[type=submit]")
            expect(page.locator("#login-error")).to_contain_text("not accepted")
            expect(page.locator("#board")).to_be_hidden()
            assert page.evaluate("sessionStorage.length") == 0

            page.fill("#key", stack.tenant.key)
            page.click("#login button[type=submit]")
            expect(page.locator("#board")).to_be_visible()
            expect(page.locator("#plan")).to_have_text(stack.plan)
            expect(page.locator("#daily")).to_contain_text("used")
            chart = page.locator("#requests-chart")
            expect(chart).to_have_attribute("data-requests", str(result.sent))
            assert float(page.eval_on_selector("#daily-meter", "m => m.value")) < float(
                page.eval_on_selector("#daily-meter", "m => m.max")
            )
            # Something was drawn: the canvas is not blank.
            assert page.evaluate(
                "() => { const c = document.getElementById('requests-chart');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false; }"
            )
            # The key is in the tab only: not a cookie, not the URL.
            assert page.evaluate("sessionStorage.getItem('narthex.apiKey')") == stack.tenant.key
            assert page.context.cookies() == []
            assert stack.tenant.key not in page.url
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
