"""Streamed steering and chat (server-sent events) against a real model process over the tiny mined
store: the streamed text equals the non-streamed answer's, a client that leaves mid-stream stops its
generation in the model process, and bad input is a 4xx with the reason before any event."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import LiveServer
from fastapi.testclient import TestClient
from test_live_api import LIMITS, wait_ready

from app.main import create_app
from sae_core.live.pool import LiveClient

ADD_40 = [{"feature": 3, "mode": "add", "value": 40}]
STEER = {"sae": "tiny-sae", "prompt": "the cat sat on the", "interventions": ADD_40, "max_new_tokens": 24}
CHAT = {
    "sae": "tiny-sae",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king said"}],
    "interventions": ADD_40,
    "max_new_tokens": 24,
}


@pytest.fixture(scope="module")
def live(mined_store):
    with TestClient(create_app(mined_store, live_config=LIMITS)) as client:
        wait_ready(client)
        yield client


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize("path,body", [("/api/v1/steer", STEER), ("/api/v1/chat", CHAT)], ids=["steer", "chat"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_streamed_text_equals_the_non_streamed_text(live, path, body, temperature):
    body = {**body, "temperature": temperature, "seed": 7}
    whole = live.post(path, json=body)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    r = live.post(f"{path}/stream", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = parse_sse(r.text)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}, kinds
    done = events[-1][1]
    assert done == whole  # the same answer, permalink included
    for which in ("default", "steered"):
        streamed = "".join(d["text"] for k, d in events if k == "token" and d["which"] == which)
        assert streamed == whole[which]["text"]
    order = [d["which"] for k, d in events if k == "token"]
    assert order == sorted(order), "the default reply streams first, then the steered one"
    assert whole["default"]["text"] != whole["steered"]["text"]


def test_a_chat_turn_goes_through_the_chat_template(live):
    result = live.post("/api/v1/chat", json=CHAT).json()
    prompt = "".join(result["prompt_tokens"])
    assert prompt == "system: be brief\nuser: the king said\nassistant:"
    assert result["permalink"].startswith("/saes/tiny-sae/chat?system=be+brief&user=the+king+said&feature=3&mode=add&value=40")


@pytest.mark.parametrize(
    "path,body,status,reason",
    [
        ("/api/v1/chat/stream", {**CHAT, "messages": []}, 422, "at least 1"),
        ("/api/v1/chat/stream", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 422, "system"),
        ("/api/v1/chat/stream", {**CHAT, "sae": "nope"}, 404, "nope"),
        ("/api/v1/steer/stream", {**STEER, "interventions": [{"feature": 10**6, "mode": "add", "value": 1}]}, 404, "1000000"),
        ("/api/v1/steer/stream", {**STEER, "max_new_tokens": 401}, 422, "less than or equal to 400"),
    ],
)
def test_bad_input_is_a_4xx_with_the_reason_before_any_event(live, path, body, status, reason):
    r = live.post(path, json=body)
    assert r.status_code == status, r.text
    assert reason in json.dumps(r.json()), r.text


def test_a_chat_turn_past_the_prompt_cap_continues_its_last_tokens(live):
    """As a long steering prompt: every turn the schema admits is answered (the API's contract)."""
    r = live.post("/api/v1/chat", json={**CHAT, "messages": [{"role": "user", "content": "hi " * 200}]})
    assert r.status_code == 200 and r.json()["prompt_truncated"] > 0 and len(r.json()["prompt_tokens"]) == LIMITS.max_prompt_tokens


def test_a_client_that_leaves_mid_stream_stops_its_generation_in_the_model_process(live):
    """Over the model process's socket: leave after the first streamed token of a 400-token request."""
    socket_path = live.app.state.live.client.socket_path
    before = live.get("/api/v1/live").json()
    request = {"op": "generate", "sae": "tiny-sae", "prompt": "the cat", "interventions": [[3, "add", 40.0]],
               "settings": {"max_new_tokens": 400, "temperature": 0.9, "top_p": 1.0, "seed": 3}}  # fmt: skip

    async def leave_after_first_token():
        events = LiveClient(socket_path, poll=0.05).stream(request)
        first = await events.__anext__()
        await events.aclose()
        return first

    first = asyncio.run(leave_after_first_token())
    assert first["which"] == "default" and first["text"]
    deadline = time.time() + 10
    while (now := live.get("/api/v1/live").json())["pending"] and time.time() < deadline:
        time.sleep(0.05)
    assert now["pending"] == 0 and now["cancelled"] == before["cancelled"] + 1, now


def test_an_http_client_that_leaves_mid_stream_stops_its_generation(mined_store):
    """Over HTTP (uvicorn): the SSE response's task ends when the client closes, which closes the model
    process's connection; the generation is counted cancelled (stopped after its current token)."""
    server = LiveServer(create_app(mined_store, live_config=LIMITS))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            deadline = time.time() + 60
            while http.get("/api/v1/live").json()["state"] != "ready" and time.time() < deadline:
                time.sleep(0.2)
            before = http.get("/api/v1/live").json()
            body = {**CHAT, "max_new_tokens": 400, "temperature": 0.9, "seed": 3}
            with http.stream("POST", "/api/v1/chat/stream", json=body) as r:
                assert r.status_code == 200
                first = next(r.iter_text())
                assert first.startswith("event: token")
            deadline = time.time() + 10
            while (now := http.get("/api/v1/live").json())["pending"] and time.time() < deadline:
                time.sleep(0.05)
            assert now["pending"] == 0 and now["cancelled"] == before["cancelled"] + 1, now
    finally:
        server.stop()


def test_the_pages_stream_endpoints_answer_a_refusal_as_one_error_event(live):
    """The pages read the stream with fetch: a refusal is an `error` event with the reason (HTTP 200, as
    the htmx cards are), so the browser logs no failed request."""
    r = live.post("/saes/tiny-sae/chat/stream", data={"user": "hi", "feature": "999999", "mode": "add", "value": "1"})
    events = parse_sse(r.text)
    assert [k for k, _ in events] == ["error"] and events[0][1]["status"] == 404 and "999999" in events[0][1]["detail"]
    r = live.post("/saes/tiny-sae/steer/stream", data={"prompt": "the cat", "max_new_tokens": "401"})
    events = parse_sse(r.text)
    assert r.status_code == 200 and events[0][0] == "error" and "400 new tokens" in events[0][1]["detail"], r.text
    r = live.post("/saes/tiny-sae/steer/stream", data={"prompt": "the cat", "feature": "3", "mode": "add", "value": "40"})
    events = parse_sse(r.text)
    steered = "".join(d["text"] for k, d in events if k == "token" and d["which"] == "steered")
    assert events[-1][0] == "done" and steered == events[-1][1]["steered"]["text"]
