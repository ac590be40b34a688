"""The chat page in chromium (CSP on, no console error) against a server with its own model process over
the tiny mined store: a chat turn's default and steered replies stream into their columns and end equal
to the API's answer; the address bar holds the permalink, which replays the turn in a fresh context."""

from __future__ import annotations

import httpx
import pytest
from conftest import LiveServer
from test_browser import page  # noqa: F401  (fixture; `browser` comes from conftest)
from test_live_api import LIMITS

from app.main import create_app


@pytest.fixture(scope="module")
def server(mined_store):
    live = LiveServer(create_app(mined_store, live_config=LIMITS))
    yield live.url
    live.stop()


def chat_from_form(page, server):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/chat")
    page.wait_for_selector(".live-ok", timeout=60_000)
    page.fill("#chat-system", "be brief")
    page.fill("#chat-user", "the king said")
    page.fill("input[name=feature] >> nth=0", "3")
    page.select_option("select[name=mode] >> nth=0", "add")
    page.fill("input[name=value] >> nth=0", "40")
    page.fill("input[name=max_new_tokens]", "48")
    page.click("#chat-form button[type=submit]")
    page.wait_for_selector("#chat-result[data-done]", timeout=60_000)


def test_a_chat_turn_streams_both_replies_and_ends_as_the_api_answers(server, page):  # noqa: F811
    chat_from_form(page, server)
    body = {"sae": "tiny-sae", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king said"}],
            "interventions": [{"feature": 3, "mode": "add", "value": 40}], "max_new_tokens": 48}  # fmt: skip
    answer = httpx.post(f"{server}/api/v1/chat", json=body, timeout=60).json()
    default, steered = page.inner_text("[data-which=default]"), page.inner_text("[data-which=steered]")
    assert page.text_content("[data-which=default]") == answer["default"]["text"]
    assert page.text_content("[data-which=steered]") == answer["steered"]["text"]
    assert default != steered
    # the tiny model writes 48 tokens in milliseconds: they may reach the page in one chunk, but as events of their own
    assert int(page.get_attribute("#chat-result", "data-events")) >= 10
    assert "system=be+brief&user=the+king+said" in page.url and "feature=3&mode=add&value=40" in page.url
    assert page.locator("#chat-result a.permalink").get_attribute("href") == answer["permalink"]


def test_a_chat_permalink_replays_the_turn_in_a_fresh_context(server, page, browser):  # noqa: F811
    chat_from_form(page, server)
    first = page.text_content("[data-which=steered]")
    link = page.locator("#chat-result a.permalink").get_attribute("href")
    context = browser.new_context()
    try:
        fresh = context.new_page()
        errors: list[str] = []
        fresh.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        fresh.goto(server + link)
        fresh.wait_for_selector("#chat-result[data-done]", timeout=60_000)
        assert fresh.text_content("[data-which=steered]") == first
        assert fresh.input_value("#chat-user") == "the king said"
        assert not errors
    finally:
        context.close()


def test_bad_input_shows_the_reason(server, page):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/chat")
    page.wait_for_selector(".live-ok", timeout=60_000)
    page.fill("#chat-user", "the king said")
    page.fill("input[name=feature] >> nth=0", "999999")
    page.click("#chat-form button[type=submit]")
    page.wait_for_selector("#chat-result.stream-error", timeout=30_000)
    reason = page.inner_text("#chat-result .stream-state")
    assert reason.startswith("404: ") and "999999" in reason, reason
