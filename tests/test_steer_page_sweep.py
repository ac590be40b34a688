"""The sweep page against a real model process over the tiny mined store: the form's stream sends
progress, then the lift and cost charts (SVG under the CSP), the suggestion and its held-out check and
the permalink; chromium draws them with no console error; bad input gets the reason."""

from __future__ import annotations

import pytest
from conftest import LiveServer
from fastapi.testclient import TestClient
from test_browser import page  # noqa: F401  (fixture; `browser` comes from conftest)
from test_live_api import LIMITS, wait_ready
from test_streamed_generation import parse_sse

from app.main import create_app

FORM = {"intervention": "3:add:1", "strengths": "10, 40", "prompts": "the cat sat\nthe king said", "heldout": "the whale ran",
        "max_new_tokens": "8"}  # fmt: skip
LINK = (  # not FORM's sweep (strength 30): this one is streamed in chromium, then stored
    "/saes/tiny-sae/sweep?intervention=3:add:1&strength=10&strength=30&prompt=the+cat+sat&prompt=the+king+said"
    "&heldout=the+whale+ran&max_new_tokens=8"
)


@pytest.fixture(scope="module")
def live(mined_store):
    with TestClient(create_app(mined_store, live_config=LIMITS)) as client:
        wait_ready(client)
        yield client


def test_the_sweep_stream_sends_progress_then_the_charts_and_the_permalink(live):
    r = live.post("/saes/tiny-sae/sweep/stream", data=FORM)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and "progress" in kinds and set(kinds[:-1]) == {"progress"}, kinds
    done = [d for _, d in events[:-1]]
    assert [d["done"] for d in done] == sorted(d["done"] for d in done) and done[-1]["done"] <= done[-1]["total"]
    html = events[-1][1]["html"]
    assert html.count("<svg") == 2 and "fluency" in html, html
    suggested = events[-1][1]["suggested"]
    assert ("Held-out check" in html) == (suggested is not None) and ("Suggested strength" in html) == (suggested is not None), html
    link = events[-1][1]["permalink"]
    assert link.startswith("/saes/tiny-sae/sweep?intervention=3%3Aadd%3A1&strength=10&strength=40&prompt=the+cat+sat")
    reopened = live.get(link)  # the sweep is stored: its permalink shows it from the store, no stream, no model run
    assert reopened.status_code == 200 and "data-autostart" not in reopened.text and "the king said" in reopened.text
    assert "Stored sweep, computed" in reopened.text and reopened.text.count("<svg") == 2


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"intervention": "3:add"}, "FEATURE:MODE:VALUE"),
        ({"strengths": "1, two"}, "'two' is not a number"),
        ({"strengths": ""}, "at least one strength"),
        ({"intervention": "999999:add:1"}, "999999"),
        ({"max_new_tokens": "300"}, "new tokens must be between"),
    ],
)
def test_bad_sweep_input_gets_the_reason(live, change, reason):
    r = live.post("/saes/tiny-sae/sweep/stream", data={**FORM, **change})
    events = parse_sse(r.text)
    assert r.status_code == 200 and [k for k, _ in events] == ["error"], r.text
    assert reason in events[0][1]["detail"] and events[0][1]["status"] in (404, 422)


@pytest.fixture(scope="module")
def server(mined_store):
    live = LiveServer(create_app(mined_store, live_config=LIMITS))
    yield live.url
    live.stop()


def test_the_sweep_chart_in_chromium_from_a_permalink(server, page):  # noqa: F811
    page.goto(server + LINK)
    page.wait_for_selector("#sweep-result[data-done]", timeout=90_000)
    lift, cost = page.locator("#sweep-lift svg"), page.locator("#sweep-cost svg")
    assert lift.count() == 1 and cost.count() == 1
    assert lift.locator("title").count() >= 3  # a tooltip per point: two strengths and the unsteered model
    assert lift.bounding_box()["width"] > 200 and cost.bounding_box()["height"] > 150
    assert page.locator(".sweep-table tbody tr").count() == 3
    assert page.locator("#sweep-suggestion").inner_text()
    assert "/saes/tiny-sae/sweep?intervention=3%3Aadd%3A1&strength=10&strength=30" in page.url
    assert page.get_attribute("#sweep-result a.permalink", "href") in page.url
    page.reload()  # the permalink again: the stored sweep, drawn by the server, with when it was computed
    page.wait_for_selector("#sweep-provenance")
    assert "Stored sweep, computed" in page.inner_text("#sweep-provenance")
    assert page.locator("#sweep-lift svg").count() == 1 and page.locator(".sweep-table tbody tr").count() == 3


def test_the_sweep_api_answers_as_the_stream_ends_and_refuses_bad_input(live):
    body = {"sae": "tiny-sae", "intervention": "3:add:1", "strengths": [10, 40], "prompts": ["the cat sat", "the king said"],
            "heldout": ["the whale ran"], "max_new_tokens": 8}  # fmt: skip
    whole = live.post("/api/v1/sweep", json=body)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    assert [p["strength"] for p in whole["points"]] == [10, 40] and whole["permalink"].startswith("/saes/tiny-sae/sweep?")
    events = parse_sse(live.post("/api/v1/sweep/stream", json=body).text)
    # the same request: the stored result (the first answer may have run it)
    assert events[-1][0] == "done" and events[-1][1] == {**whole, "stored": True}
    bad = live.post("/api/v1/sweep", json={**body, "intervention": "3:add"})
    assert bad.status_code == 422 and "intervention" in bad.text and "pattern" in bad.text  # the field and the reason
    assert live.post("/api/v1/sweep", json={**body, "strengths": []}).status_code == 422
