"""The live pages in a real browser (Playwright + Debian's chromium) against a server with its own model
process over the tiny mined store: type a text and see highlighted tokens, steer and see both
columns, open the steering permalink in a fresh browser context and see the same result."""

from __future__ import annotations

import pytest
from conftest import LiveServer
from test_browser import page  # noqa: F401  (fixture; `browser` comes from conftest)
from test_live_api import LIMITS

from app.main import create_app

TEXT = "The cat sat over the big red house. Then the king said that the whale ran."


@pytest.fixture(scope="module")
def server(mined_store):
    live = LiveServer(create_app(mined_store, live_config=LIMITS))
    yield live.url
    live.stop()


def test_inference_page_highlights_tokens_and_lists_their_features(server, page):
    page.goto(f"{server}/saes/tiny-sae/inference")
    page.wait_for_selector(".live-ok", timeout=60_000)  # the model process is up
    page.fill("#inference-text", TEXT)
    page.click("#inference-form button[type=submit]")
    page.wait_for_selector("#live-tokens .tok", timeout=30_000)
    tokens = page.locator("#live-tokens .tok")
    assert "".join(tokens.all_inner_texts()).replace("·", " ") == TEXT
    highlighted = page.locator("#live-tokens .tok[class*=' h']")
    assert highlighted.count() > 10
    assert page.locator("#live-tokens .tok.h20").count() >= 1  # the strongest token of the text
    highlighted.nth(3).click()
    panel = page.locator(".token-features:not([hidden])")
    assert panel.count() == 1 and panel.locator("a[href^='/saes/tiny-sae/features/']").count() >= 1
    feature = panel.locator("a").first.inner_text().lstrip("#")
    panel.locator("button.pick-feature").first.click()
    page.wait_for_selector(f"text=Feature #{feature} on each token", timeout=30_000)
    assert page.locator("#live-tokens .tok[class*=' h']").count() >= 1


def steer_from_form(page, server):
    page.goto(f"{server}/saes/tiny-sae/steer")
    page.fill("#steer-prompt", "the cat sat")
    page.fill("input[name=feature] >> nth=0", "3")
    page.select_option("select[name=mode] >> nth=0", "add")
    page.fill("input[name=value] >> nth=0", "150")
    page.fill("input[name=max_new_tokens]", "12")
    page.click("#steer-form button[type=submit]")
    page.wait_for_selector("#steer-steered .tok", timeout=60_000)


def test_steering_shows_both_columns_and_marks_where_they_diverge(server, page):
    steer_from_form(page, server)
    assert "prompt=the+cat+sat" in page.url and "feature=3&mode=add&value=150" in page.url  # the URL is the permalink
    default, steered = page.locator("#steer-default .tok"), page.locator("#steer-steered .tok")
    assert default.count() >= 1 and steered.count() >= 1
    assert default.all_inner_texts() != steered.all_inner_texts()
    assert page.locator("#steer-steered .tok.diverged").count() >= 1
    assert "deterministic for a given seed, model dtype and machine kind" in page.inner_text("body")


def test_a_steering_permalink_gives_the_same_result_in_a_fresh_context(server, page, browser):  # noqa: F811
    steer_from_form(page, server)
    link = page.locator("a.permalink").get_attribute("href")
    first = page.locator("#steer-steered").inner_text()
    context = browser.new_context()
    try:
        fresh = context.new_page()
        errors: list[str] = []
        fresh.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        fresh.goto(server + link)
        fresh.wait_for_selector("#steer-steered .tok", timeout=60_000)
        assert fresh.locator("#steer-steered").inner_text() == first
        assert fresh.input_value("#steer-prompt") == "the cat sat" and fresh.input_value("input[name=feature] >> nth=0") == "3"
        assert not errors
    finally:
        context.close()


def test_feature_page_try_box_highlights_the_text_by_that_feature(server, page):
    page.goto(f"{server}/saes/tiny-sae/features/3")
    page.fill("#try-text textarea", TEXT)
    page.click("#try-text button[type=submit]")
    page.wait_for_selector("#try-result .tok", timeout=60_000)
    assert "".join(page.locator("#try-result .tok").all_inner_texts()).replace("·", " ") == TEXT
    page.click("text=Steer with this feature")
    page.wait_for_selector("#steer-form")
    assert page.input_value("input[name=feature] >> nth=0") == "3"


def test_a_permalink_opened_while_the_model_loads_says_so_then_shows_its_result(mined_store, page):  # noqa: F811
    """Right after a start the streamed result says the model process is starting and asks again by itself
    after the Retry-After until the model answers: the reader of a shared link waits, without reloading,
    and gets the result."""
    live = LiveServer(create_app(mined_store, live_config=LIMITS))  # its model process is still importing torch
    try:
        page.goto(live.url + "/saes/tiny-sae/steer?prompt=the+cat+sat&feature=3&mode=add&value=150&max_new_tokens=8")
        page.wait_for_selector("#steer-result[data-waiting]", timeout=10_000)
        assert "the model process is starting; trying again in" in page.inner_text("#steer-result")
        page.wait_for_selector("#steer-steered .tok", timeout=120_000)
        assert page.get_attribute("#steer-result", "data-waiting") is None
        assert page.get_attribute("#steer-result", "data-done") == "true"
    finally:
        page.goto("about:blank")  # nothing on the page asks this server anything once it stops
        live.stop()
