"""/compare in a real browser (Playwright, Debian's chromium) under the app's Content-Security-Policy: the
plots render as SVG with no console error or CSP violation, a point links to its SAE, and the chooser's
form compares the SAEs left checked."""

from __future__ import annotations

import pytest
from conftest import ARTIFACTS, LiveServer
from test_compare import fill

from app.main import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('compare-browser') / 'store.db'}"
    fill(url)
    live = LiveServer(create_app(url))
    yield live.url
    live.stop()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors or CSP violations: {errors}"


def test_plots_render_under_the_csp_and_points_link_to_their_sae(server, page):
    page.goto(f"{server}/compare?saes=topk-16,topk-32,batchtopk-16,jumprelu-2k")
    plots = page.locator("svg.plot")
    assert plots.count() == 4
    for i in range(4):
        box = plots.nth(i).bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 200  # laid out, not collapsed by a refused style
    fvu = page.locator("#plot-fvu_vs_l0 svg")
    assert fvu.locator("a.point").count() == 3 and fvu.locator(".legend-entry").count() == 2
    # the stylesheet applied (static/compare.css): the best cell of a row is bold
    best = page.locator("td.best").first
    assert best.evaluate("el => getComputedStyle(el).fontWeight") in ("700", "bold")
    point = fvu.locator('a.point[href="/saes/topk-32"]')
    assert "topk-32: L0 32" in point.locator("title").text_content()
    point.click()
    page.wait_for_url(f"{server}/saes/topk-32")
    assert page.locator("h1").text_content() == "topk-32"


def test_chooser_compares_what_is_left_checked(server, page):
    page.goto(f"{server}/compare?saes=topk-16")
    form = page.locator("form.compare-chooser")
    assert form.locator('input[name="saes"]').count() == 4  # the SAEs of this model and hook
    form.locator('input[value="topk-32"]').check()
    form.locator('input[value="batchtopk-16"]').check()
    form.locator("button").click()
    page.wait_for_url("**/compare?saes=*")
    heads = [h.strip() for h in page.locator("#compare-table thead tr").first.locator("th").all_text_contents()]
    assert heads == ["metric", "batchtopk-16", "topk-16", "topk-32"]
    page.goto(f"{server}/")
    page.locator("a.compare-link").first.click()
    page.wait_for_url("**/compare?saes=*")
    assert page.locator("#compare-table thead tr").first.locator("th").count() == 5  # metric + the 4 SAEs at that hook
