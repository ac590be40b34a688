"""The map page and the feature page's inset in chromium (Playwright) against a live server, with the
app's Content-Security-Policy on: hover names the feature under the cursor, a click opens its page,
search lights matching features up, pan and zoom move the points, the inset marks the feature and
links its map neighbours; no script error and no CSP violation anywhere."""

from __future__ import annotations

import time

import pytest
from conftest import ARTIFACTS, LiveServer
from test_map import copy_store, points

from app.main import create_app
from sae_core.config import MapConfig
from sae_core.relations.map import build_map


@pytest.fixture(scope="module")
def server(mined_store, tmp_path_factory):
    url = copy_store(mined_store, tmp_path_factory.mktemp("map-browser"))
    build_map("tiny-sae", MapConfig(db=url, min_cluster_size=5))
    live = LiveServer(create_app(url))
    yield live.url, points(url)
    live.stop()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)  # CSP violations land here
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors or CSP violations: {errors}"


def wait_until(page, expression: str, timeout: float = 30) -> None:
    """Poll `expression` with page.evaluate: Playwright's wait_for_function polls through eval, which the
    page's CSP (rightly) refuses once the first check comes back false."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)


def open_map(page, base: str, fragment: str = "") -> None:
    page.goto(f"{base}/saes/tiny-sae/map{fragment}")
    wait_until(page, "!!(window.saescopeMap && window.saescopeMap.ready && window.saescopeMap.labelsReady)")


def canvas_point(page, index: int) -> tuple[float, float]:
    """Page coordinates of feature `index` as the map draws it."""
    box = page.locator("#map-canvas").bounding_box()
    x, y = page.evaluate(f"window.saescopeMap.screenPosition({index})")
    return box["x"] + x, box["y"] + y


def isolated(rows: list[tuple]) -> int:
    """A feature with no other point within 12 px at the fitted view is found by hit-testing alone; take
    the one farthest from its nearest map neighbour."""
    return max(rows, key=lambda r: r[4][0][1])[0]


def test_hover_names_the_feature_and_click_opens_it(server, page):
    base, rows = server
    open_map(page, base)
    assert page.evaluate("window.saescopeMap.n") == len(rows)
    assert "features" in page.locator("#map-status").inner_text()
    target = isolated(rows)
    x, y = canvas_point(page, target)
    page.mouse.move(x, y)
    tip = page.locator("#map-tip")
    tip.wait_for(state="visible")
    assert tip.inner_text().startswith(f"#{target} ·") and "strongest token" in tip.inner_text()
    page.mouse.click(x, y)
    page.wait_for_url(f"{base}/saes/tiny-sae/features/{target}")
    assert page.locator("h1").inner_text().endswith(f"feature #{target}")


def test_pan_zoom_colours_and_search(server, page):
    base, rows = server
    open_map(page, base)
    target = isolated(rows)
    before = canvas_point(page, target)
    page.mouse.move(600, 400)
    page.mouse.down()
    page.mouse.move(650, 430, steps=5)
    page.mouse.up()
    after = canvas_point(page, target)
    assert abs(after[0] - before[0] - 50) < 1 and abs(after[1] - before[1] - 30) < 1  # dragged with the pointer
    page.mouse.wheel(0, -400)  # zoom in about the cursor
    page.wait_for_timeout(100)
    zoomed = canvas_point(page, target)
    assert abs(zoomed[0] - after[0]) > 1 or abs(zoomed[1] - after[1]) > 1
    page.select_option("#map-colour", "cluster")
    assert "clusters" in page.locator("#map-legend").inner_text()
    token = page.evaluate(
        "fetch(location.pathname + '/labels.json').then(r => r.json()).then(l => l.tokens.find(t => t && /^ ?[a-z]+$/i.test(t)))"
    )
    page.fill("#map-query", token.strip())
    page.click("#map-search button[type=submit]")
    wait_until(page, "document.getElementById('map-status').textContent.includes('match')")
    assert page.locator("#map-colour").input_value() == "search"
    assert int(page.locator("#map-status").inner_text().split()[0].replace(",", "")) >= 1


def test_feature_page_inset_marks_it_and_links_its_neighbours(server, page):
    base, rows = server
    index, _, _, _, near = rows[5]
    page.goto(f"{base}/saes/tiny-sae/features/{index}")
    page.wait_for_selector("#map-inset svg.map-inset")  # loaded by htmx after the first paint
    assert page.locator("#map-inset svg circle.here").count() == 1
    links = page.locator("#map-inset a.map-neighbour")
    assert [int(t.lstrip("#")) for t in links.all_inner_texts()] == [n[0] for n in near]
    links.first.click()
    page.wait_for_url(f"{base}/saes/tiny-sae/features/{near[0][0]}")
    page.goto(f"{base}/saes/tiny-sae/features/{index}")
    page.locator("#map-inset a.map-inset-link").click()
    page.wait_for_url(f"{base}/saes/tiny-sae/map#f={index}")
    wait_until(page, "!!(window.saescopeMap && window.saescopeMap.ready)")
    x, y = page.evaluate(f"window.saescopeMap.screenPosition({index})")
    box = page.locator("#map-canvas").bounding_box()
    assert abs(x - box["width"] / 2) < 2 and abs(y - box["height"] / 2) < 2  # the map opens centred on it
