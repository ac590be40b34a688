"""The steering page streams (chromium, CSP on, no console error; a server with its own model process over
the tiny mined store): the default, steered and, when asked, frozen-attention columns fill as the tokens
come and end equal to the API's answer for the same greedy request, then give way to the result fragment
(tokens, where they diverge, the permalink, the link to the sweep page prefilled); the address bar takes
the permalink, which replays the result; a refusal shows its reason. And the chat page's conditions: a
conditional chat turn's permalink holds its condition and replays it, as the API answers that request."""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import LiveServer
from test_browser import page  # noqa: F401  (fixture; `browser` comes from conftest)
from test_live_api import LIMITS

from app.main import create_app

PROMPT = "the cat sat on the"
ADD_40 = [{"feature": 3, "mode": "add", "value": 40}]


@pytest.fixture(scope="module")
def server(mined_store):
    live = LiveServer(create_app(mined_store, live_config=LIMITS))
    yield live.url
    live.stop()


def steer_from_form(page, server, frozen: bool):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/steer")
    page.wait_for_selector(".live-ok", timeout=60_000)
    page.fill("#steer-prompt", PROMPT)
    page.fill("input[name=feature] >> nth=0", "3")
    page.select_option("select[name=mode] >> nth=0", "add")
    page.fill("input[name=value] >> nth=0", "40")
    page.fill("input[name=max_new_tokens]", "24")
    if frozen:
        page.check("input[name=frozen]")
    page.click("#steer-form button[type=submit]")
    page.wait_for_selector("#steer-result[data-done]", timeout=60_000)


def streamed(page, which: str) -> str:  # noqa: F811
    return page.text_content(f"#steer-result .stream-text[data-which={which}]")


def test_the_steering_page_streams_its_three_columns_and_ends_as_the_api_answers(server, page):  # noqa: F811
    steer_from_form(page, server, frozen=True)
    body = {"sae": "tiny-sae", "prompt": PROMPT, "interventions": ADD_40, "max_new_tokens": 24, "frozen_attention": True}
    answer = httpx.post(f"{server}/api/v1/steer", json=body, timeout=60).json()
    for which in ("default", "steered", "frozen"):
        assert answer[which]["text"] and streamed(page, which) == answer[which]["text"], which
    assert answer["default"]["text"] != answer["steered"]["text"]
    # the tiny model writes 3 x 24 tokens in milliseconds: they may reach the page in one chunk, but as events of their own
    # (one per token whose text is whole: a token that ends inside a character waits for the next)
    assert int(page.get_attribute("#steer-result", "data-events")) >= 10
    # the streamed columns gave way to the result fragment: every token, the divergence marked, all three columns
    assert page.locator("#steer-result .stream-live").is_hidden()
    assert page.get_attribute("[data-if-field=frozen]", "hidden") is None  # the frozen column was shown while it streamed
    for which in ("default", "steered", "frozen"):
        assert page.locator(f"#steer-{which} .tok").count() == len(answer[which]["tokens"]), which
    assert page.locator("#steer-steered .tok.diverged").count() >= 1
    assert "attention frozen" in page.inner_text("#steer-frozen h3")
    assert page.url == server + answer["permalink"] and answer["permalink"].endswith("&frozen=1")
    assert page.get_attribute("#steer-result a.permalink", "href") == answer["permalink"]
    sweep = page.get_attribute("#steer-result a.sweep-link", "href")
    assert sweep == "/saes/tiny-sae/sweep?intervention=3%3Aadd%3A40&strength=10&strength=20&strength=40&strength=80&strength=160"


def test_the_sweep_link_opens_the_sweep_page_with_the_intervention(server, page):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/steer?prompt=the+cat&feature=3&mode=add&value=2&when=gen&max_new_tokens=4")
    page.wait_for_selector("#steer-result[data-done]", timeout=60_000)
    page.click("#steer-result a.sweep-link")
    page.wait_for_selector("#sweep-form")
    assert page.input_value("input[name=intervention]") == "3:add:2@gen"
    assert page.input_value("input[name=strengths]") == "0.5, 1, 2, 4, 8"
    page.goto("about:blank")  # the sweep it started is left (the page aborts its stream)
    # the steering page names the sweep page before any run too
    page.goto(f"{server}/saes/tiny-sae/steer")
    assert page.get_attribute("a[href='/saes/tiny-sae/sweep']", "href") == "/saes/tiny-sae/sweep"


def test_without_frozen_attention_there_is_no_frozen_column(server, page):  # noqa: F811
    steer_from_form(page, server, frozen=False)
    assert page.get_attribute("[data-if-field=frozen]", "hidden") is not None
    assert streamed(page, "frozen") == "" and page.locator("#steer-frozen").count() == 0
    assert page.locator("#steer-steered .tok").count() >= 1 and "frozen" not in page.url


def test_a_steering_permalink_replays_by_streaming_in_a_fresh_context(server, page, browser):  # noqa: F811
    steer_from_form(page, server, frozen=True)
    link = page.get_attribute("#steer-result a.permalink", "href")
    first = {w: streamed(page, w) for w in ("default", "steered", "frozen")}
    context = browser.new_context()
    try:
        fresh = context.new_page()
        errors: list[str] = []
        fresh.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        fresh.on("pageerror", lambda e: errors.append(str(e)))
        fresh.goto(server + link)
        fresh.wait_for_selector("#steer-result[data-done]", timeout=60_000)
        assert {w: streamed(fresh, w) for w in first} == first
        assert int(fresh.get_attribute("#steer-result", "data-events")) >= 10
        assert fresh.is_checked("input[name=frozen]") and fresh.input_value("#steer-prompt") == PROMPT
        assert fresh.url == server + link
        assert not errors
    finally:
        context.close()


@pytest.mark.parametrize(
    "feature,when,reason",
    [("999999", "", r"404: .*no feature 999999"), ("3", "sometimes", "422: intervention 1: condition: "), ("3", "5>100000", None)],
    ids=["unknown-feature", "bad-condition", "condition-never-holds"],
)
def test_a_refusal_shows_its_reason_and_a_condition_is_read(server, page, feature, when, reason):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/steer")
    page.wait_for_selector(".live-ok", timeout=60_000)
    page.fill("#steer-prompt", PROMPT)
    page.fill("input[name=feature] >> nth=0", feature)
    page.select_option("select[name=mode] >> nth=0", "add")
    page.fill("input[name=value] >> nth=0", "40")
    page.fill("input[name=when] >> nth=0", when)
    page.fill("input[name=max_new_tokens]", "12")
    page.click("#steer-form button[type=submit]")
    if reason is None:  # a condition that never holds: the steered continuation is the default one
        page.wait_for_selector("#steer-result[data-done]", timeout=60_000)
        assert streamed(page, "steered") == streamed(page, "default") != ""
        assert "when=5%3E100000" in page.url and "They diverge" not in page.inner_text("#steer-result")
        return
    page.wait_for_selector("#steer-result.stream-error", timeout=30_000)
    shown = page.inner_text("#steer-result .stream-state")
    assert re.match(reason, shown), shown
    assert page.get_attribute("#steer-result", "data-done") is None


CHAT = {"system": "be brief", "user": "the king said"}


def test_a_conditional_chat_permalink_replays_with_its_condition(server, page, browser):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/chat")
    page.wait_for_selector(".live-ok", timeout=60_000)
    assert page.locator("#chat-form th", has_text="only where").count() == 1
    page.fill("#chat-system", CHAT["system"])
    page.fill("#chat-user", CHAT["user"])
    page.fill("input[name=feature] >> nth=0", "3")
    page.select_option("select[name=mode] >> nth=0", "add")
    page.fill("input[name=value] >> nth=0", "40")
    page.fill("input[name=when] >> nth=0", "gen")
    page.fill("input[name=max_new_tokens]", "32")
    page.click("#chat-form button[type=submit]")
    page.wait_for_selector("#chat-result[data-done]", timeout=60_000)

    messages = [{"role": "system", "content": CHAT["system"]}, {"role": "user", "content": CHAT["user"]}]
    body = {"sae": "tiny-sae", "messages": messages, "max_new_tokens": 32}
    answer = httpx.post(f"{server}/api/v1/chat", json={**body, "interventions": [{**ADD_40[0], "condition": "gen"}]}, timeout=60).json()
    everywhere = httpx.post(f"{server}/api/v1/chat", json={**body, "interventions": ADD_40}, timeout=60).json()
    assert page.text_content("#chat-result [data-which=default]") == answer["default"]["text"]
    assert page.text_content("#chat-result [data-which=steered]") == answer["steered"]["text"]
    assert answer["steered"]["text"] != everywhere["steered"]["text"]  # the condition was applied: the prompt is left as it is
    link = page.get_attribute("#chat-result a.permalink", "href")
    assert link == answer["permalink"] and "feature=3&mode=add&value=40&when=gen" in link
    assert page.url == server + link

    context = browser.new_context()
    try:
        fresh = context.new_page()
        errors: list[str] = []
        fresh.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        fresh.on("pageerror", lambda e: errors.append(str(e)))
        fresh.goto(server + link)
        fresh.wait_for_selector("#chat-result[data-done]", timeout=60_000)
        assert fresh.input_value("input[name=when] >> nth=0") == "gen" and fresh.input_value("input[name=feature] >> nth=0") == "3"
        assert fresh.text_content("#chat-result [data-which=steered]") == answer["steered"]["text"]
        assert fresh.get_attribute("#chat-result a.permalink", "href") == link
        assert not errors
    finally:
        context.close()
