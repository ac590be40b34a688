"""The feature browser in a real browser: Playwright driving Debian's chromium against a live server.

Screenshots of every page visited land in test-artifacts/browser/ so a failure can be inspected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ARTIFACTS, CHROMIUM, LiveServer  # noqa: F401  (CHROMIUM: imported from here by other modules)
from test_app import XSS, plant_tokens

from app.main import create_app


@pytest.fixture(scope="module")
def server(mined_store):
    planted = plant_tokens(mined_store)
    live = LiveServer(create_app(mined_store))
    yield live.url, planted
    live.stop()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1200, "height": 1400})
    pg = context.new_page()
    dialogs, errors = [], []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # A CSP violation (an inline script or style the policy refused) is reported on the console.
    pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.dialogs, pg.errors = dialogs, errors
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not dialogs, f"a script ran: {dialogs}"
    assert not errors, f"JavaScript errors or CSP violations: {errors}"


def test_feature_page_renders_highlights_histogram_and_lazy_intervals(server, page):
    base, planted = server
    page.goto(f"{base}/saes/tiny-sae/features/{planted['feature']}")
    highlighted = page.locator(".context .tok[class*=' h']")       # highlight classes h1..h20, styled by style.css
    assert highlighted.count() > 0
    assert highlighted.first.evaluate("el => getComputedStyle(el).backgroundColor").startswith("rgba(255, 111, 0")
    assert page.locator(".context .tok.peak").count() >= 1
    assert page.locator("svg.hist rect.bar").count() > 0
    assert page.get_by_text("count (log)").is_visible()
    page.wait_for_selector("#interval-examples .interval")     # loaded by htmx after the first paint
    assert page.locator("#interval-examples .interval").count() == 4
    # the XSS token is shown as text, and no script ran (checked by the fixture)
    assert page.locator(".context").get_by_text(XSS, exact=False).count() >= 1
    title = highlighted.first.get_attribute("title")
    assert title and "token" in title


def test_follow_neighbour_and_prev_next(server, page):
    base, planted = server
    page.goto(f"{base}/saes/tiny-sae/features/5")
    link = page.locator("a.neighbour").first
    target = link.get_attribute("href")
    link.click()
    page.wait_for_url(f"{base}{target}")
    assert page.locator("h1").inner_text().endswith(target.rsplit("/", 1)[1])
    page.goto(f"{base}/saes/tiny-sae/features/5")
    page.click("a[rel=next]")
    page.wait_for_url(f"{base}/saes/tiny-sae/features/6")


def test_feature_table_sort_filter_and_jump(server, page):
    base, _ = server
    page.goto(f"{base}/saes/tiny-sae")
    page.get_by_role("link", name="density").click()            # htmx swaps the table and pushes the URL
    page.wait_for_url("**sort=density**")
    page.get_by_role("link", name="dead").click()
    page.wait_for_url("**filter=dead**")
    page.fill("input[name=index]", "17")
    page.click("text=Go")
    page.wait_for_url(f"{base}/saes/tiny-sae/features/17")


def test_search_from_the_header(server, page):
    base, planted = server
    page.goto(base)
    page.fill("header input[name=q]", "script")
    page.press("header input[name=q]", "Enter")
    page.wait_for_url("**/search?q=script**")
    hit = page.locator(f"a.hit[href='/saes/tiny-sae/features/{planted['feature']}']")
    assert hit.count() == 1
    hit.click()
    page.wait_for_url(f"{base}/saes/tiny-sae/features/{planted['feature']}")


def test_csp_is_on_and_swagger_ui_runs_under_it(server, page):
    base, _ = server
    response = page.goto(f"{base}/docs")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    if (Path(__file__).resolve().parent.parent / "static" / "vendor" / "swagger-ui" / "swagger-ui-bundle.js").exists():
        page.wait_for_selector(".opblock-summary-path")        # Swagger UI rendered the operations from /openapi.json
        assert page.locator(".opblock").count() >= 8


def test_an_inline_script_would_be_refused(server, page):
    """The fixture's console check is live: the policy really blocks an injected inline script."""
    base, _ = server
    page.goto(f"{base}/")
    page.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.ran = 1'; document.body.append(s); }""")
    assert page.evaluate("() => window.ran") is None
    assert any("Content Security Policy" in e for e in page.errors)
    page.errors.clear()
