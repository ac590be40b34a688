"""Attribution graphs built on request (issue 29 items 2 and 4) on the tiny Llama with transcoders for its 4 layers:
the model process's "trace" op builds through sae_core/circuits/trace.py (the graph equals `trace`'s own, the slug is
the CLI's permalink), streams progress and stores it; POST /api/v1/trace (and /stream) answers its slug and the
graph opens at /graphs/{slug}; bad input is refused with the reason (422, 404); a time limit too small stops the
build with an error and stores nothing; with live off the page says how to build one; the /graphs page's form
streams the build and opens the graph in chromium."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import mine_tiny
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from test_live_api import LIMITS, wait_ready

from app.main import create_app
from sae_core.circuits.trace import TraceConfig, trace
from sae_core.config import LiveConfig
from sae_core.live.errors import LiveError
from sae_core.live.pool import ModelServer
from sae_core.live.runtime import LiveRuntime
from sae_core.store import db
from sae_core.store.schema import AttributionGraphRecord

PROMPT = "The cat sat on the mat and the dog"
NODES = 0.95  # as tests/test_trace.py: at the default 0.8 the tiny model's graphs keep no feature
GRAPH_LIMITS = replace(LIMITS, graph_time_limit=120.0)


@pytest.fixture(scope="module")
def store(tc_dir, tiny_lm, tmp_path_factory) -> str:
    """A store that knows the set through its mined layer 1 (no graph traced yet)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('graph-build') / 'store.db'}"
    mine_tiny(tc_dir / "layer_1", tiny_lm, url, windows=16)
    return url


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store, live_config=GRAPH_LIMITS)) as c:
        wait_ready(c)
        yield c


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        event = re.search(r"^event: (.*)$", block, re.M)
        data = re.search(r"^data: (.*)$", block, re.M)
        out.append((event.group(1) if event else "message", json.loads(data.group(1)) if data else {}))
    return out


def n_graphs(url: str) -> int:
    engine = db.make_engine(url)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(AttributionGraphRecord)).scalar_one()
    engine.dispose()
    return int(n)


def test_the_trace_op_builds_streams_progress_and_stores(tc_dir, store, tiny_lm, tmp_path):
    """The pool's op in-process: progress events per batch of targets, the graph stored under trace's permalink."""
    url = f"sqlite:///{tmp_path / 'op.db'}"
    engine = db.open_store(url, upgrade_schema=True)
    server = ModelServer(LiveRuntime(LiveConfig(live_device="cpu"), engine=engine, lm=tiny_lm), LiveConfig(graph_time_limit=60))
    events: list[dict] = []
    request = {"op": "trace", "request": {"prompt": PROMPT, "transcoders": str(tc_dir), "node_threshold": NODES, "edge_threshold": 0.9}}
    result = server.execute(request, lambda: None, events.append)
    progress = [e["progress"] for e in events]
    assert progress and all(p["stage"] == "attribution" and p["unit"] == "targets" for p in progress)
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress) and progress[-1]["done"] == progress[-1]["total"]
    assert not result["reused"] and result["url"] == f"/graphs/{result['slug']}" and 0 < result["nodes_after"] < result["nodes_before"]
    again = server.execute(request, lambda: None, events.append)
    assert again["reused"] and again["slug"] == result["slug"] and len(events) == len(progress)  # stored: nothing ran
    with pytest.raises(LiveError, match="not a graph request"):
        server.execute({"op": "trace", "request": {"prompt": PROMPT, "transcoders": str(tc_dir), "bogus": 1}}, lambda: None)
    engine.dispose()


def test_a_time_limit_too_small_stops_the_build_and_stores_nothing(tc_dir, tiny_lm, tmp_path):
    url = f"sqlite:///{tmp_path / 'limit.db'}"
    engine = db.open_store(url, upgrade_schema=True)
    server = ModelServer(LiveRuntime(LiveConfig(live_device="cpu"), engine=engine, lm=tiny_lm), LiveConfig(graph_time_limit=0.01))
    with pytest.raises(LiveError, match=r"ran past its time limit of 0.01 s") as caught:
        server.execute({"op": "trace", "request": {"prompt": PROMPT, "transcoders": str(tc_dir)}}, lambda: None)
    assert caught.value.status == 422
    assert n_graphs(url) == 0
    cancelled = ModelServer(LiveRuntime(LiveConfig(live_device="cpu"), engine=engine, lm=tiny_lm), LiveConfig(graph_time_limit=60))
    with pytest.raises(LiveError, match="cancelled"):  # the client went away: the build stops at its next batch
        cancelled.execute({"op": "trace", "request": {"prompt": PROMPT, "transcoders": str(tc_dir)}}, lambda: "cancelled")
    assert n_graphs(url) == 0
    engine.dispose()


def test_the_api_builds_the_graph_trace_builds(client, store, tc_dir, tiny_lm, tmp_path):
    r = client.post("/api/v1/trace", json={"prompt": PROMPT, "transcoders": str(tc_dir), "node_threshold": NODES})
    assert r.status_code == 200, r.text
    built = r.json()
    assert not built["reused"] and built["url"] == f"/graphs/{built['slug']}" and built["verification"] is not None
    # the same prompt traced directly (another store, so it is built, not found): the same permalink and graph
    direct = trace(TraceConfig(PROMPT, tc_dir, db=f"sqlite:///{tmp_path / 'direct.db'}", node_threshold=NODES), lm=tiny_lm)
    assert not direct.reused and direct.slug == built["slug"]
    assert (built["nodes_after"], built["edges_after"]) == (direct.nodes_after, direct.edges_after)
    assert built["nodes_before"] == direct.nodes_before
    detail = client.get(f"/api/v1/graphs/{built['slug']}").json()
    key = ("kind", "layer", "pos", "feature", "token")
    assert [tuple(n.get(k) for k in key) for n in detail["nodes"]] == [tuple(n.get(k) for k in key) for n in direct.graph["nodes"]]
    got = sorted((e["source"], e["target"], e["weight"]) for e in detail["edges"])
    want = sorted((s, t, w) for s, t, w in direct.graph["edges"])
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in want]
    np.testing.assert_allclose([w for *_, w in got], [w for *_, w in want], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(built["replacement_score"], direct.replacement_score, rtol=1e-5)
    # the stored graph opens, is listed, and asking again finds it
    page = client.get(built["url"])
    assert page.status_code == 200 and "/static/graph.js" in page.text
    assert built["url"] in client.get("/graphs").text
    again = client.post("/api/v1/trace", json={"prompt": PROMPT, "transcoders": str(tc_dir), "node_threshold": NODES})
    assert again.status_code == 200 and again.json()["reused"] and again.json()["slug"] == built["slug"]
    sets = client.get("/api/v1/transcoder-sets").json()
    assert [(s["folder"], s["graphs"], s["mined"]) for s in sets] == [(str(tc_dir.resolve()), 1, 1)]


def test_the_streamed_api_sends_progress_then_the_answer(client, tc_dir):
    body = {"prompt": PROMPT, "transcoders": str(tc_dir), "node_threshold": NODES, "edge_threshold": 0.8}
    r = client.post("/api/v1/trace/stream", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse(r.text)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"} and len(kinds) >= 2, kinds
    done = events[-1][1]
    assert done["slug"] and done["url"] == f"/graphs/{done['slug']}" and not done["reused"]
    assert client.get(done["url"]).status_code == 200


def test_bad_input_is_refused_with_the_reason(client, tc_dir):
    ok = {"prompt": PROMPT, "transcoders": str(tc_dir)}
    long = client.post("/api/v1/trace", json={**ok, "prompt": " ".join(["the cat"] * 60)})
    assert long.status_code == 422 and "attribution graphs take at most 64" in long.json()["detail"], long.text
    unknown = client.post("/api/v1/trace", json={**ok, "transcoders": "/etc"})
    assert unknown.status_code == 404 and "no transcoder set '/etc'" in unknown.json()["detail"] and str(tc_dir) in unknown.json()["detail"]
    for field, value in (("node_threshold", 1.5), ("node_threshold", 0), ("edge_threshold", -0.1), ("max_feature_nodes", 0)):
        bad = client.post("/api/v1/trace", json={**ok, field: value})
        assert bad.status_code == 422, bad.text
        assert any(e["loc"][-1] == field for e in bad.json()["detail"]), bad.text
    empty = client.post("/api/v1/trace", json={**ok, "prompt": "   "})
    assert empty.status_code == 422 and "the prompt is empty" in empty.json()["detail"]
    streamed = client.post("/api/v1/trace/stream", json={**ok, "transcoders": "/nowhere"})
    assert streamed.status_code == 404 and "no transcoder set" in streamed.text
    # the page's form: refusals come back as one `error` event with the reason
    form = client.post("/graphs/build/stream", data={**ok, "node_threshold": "2"})
    assert form.status_code == 200 and [k for k, _ in sse(form.text)] == ["error"]
    error = sse(form.text)[0][1]
    assert error["status"] == 422 and "node_threshold" in error["detail"]
    unknown_form = sse(client.post("/graphs/build/stream", data={**ok, "transcoders": "/nowhere"}).text)
    assert unknown_form[0][0] == "error" and unknown_form[0][1]["status"] == 404


def test_the_build_routes_are_model_routes(client):
    """The accounts' model-route limits (sign-in, per-minute caps) cover the graph builds as every live POST."""
    from app.accounts.middleware import model_routes

    paths = {r.path for r in model_routes(client.app)}
    assert {"/api/v1/trace", "/api/v1/trace/stream", "/graphs/build/stream"} <= paths


def test_with_live_off_the_page_says_how_to_build_one(store, tc_dir):
    with TestClient(create_app(store)) as c:
        page = c.get("/graphs")
        assert page.status_code == 200 and 'id="graph-build-off"' in page.text and "saescope trace" in page.text
        assert 'id="graph-form"' not in page.text and "live_stream.js" not in page.text
        r = c.post("/api/v1/trace", json={"prompt": PROMPT, "transcoders": str(tc_dir)})
        assert r.status_code == 503 and "live features are off" in r.json()["detail"]


def test_the_page_form_streams_the_build_and_opens_the_graph(store, tc_dir, browser):
    from conftest import ARTIFACTS, LiveServer

    server = LiveServer(create_app(store, live_config=GRAPH_LIMITS))
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        streamed: list[str] = []

        def record(route) -> None:  # the stream as the server sent it, handed on to the page unchanged
            response = route.fetch(timeout=120_000)
            body = response.text()
            streamed.append(body)
            route.fulfill(response=response, body=body)

        page.route("**/graphs/build/stream", record)
        page.goto(f"{server.url}/graphs")
        page.wait_for_selector("#graph-form")
        assert page.locator("select[name=transcoders] option").count() == 1
        page.fill("#graph-prompt", "The dog sat on the mat and the cat")
        page.fill("input[name=node_threshold]", str(NODES))
        page.fill("input[name=edge_threshold]", "0.95")
        for _ in range(120):  # the model process loads first: the form asks again after its Retry-After by itself
            if page.evaluate("fetch('/api/v1/live').then(r => r.json()).then(s => s.state)") == "ready":
                break
            page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "graphs_build_form.png"), full_page=True)
        page.click("#graph-form button[type=submit]")
        page.wait_for_url(re.compile(r".*/graphs/[0-9a-f]{12}$"), timeout=120_000)
        page.wait_for_selector("#graph-svg .node.feature")
        page.screenshot(path=str(ARTIFACTS / "graph_built_from_page.png"), full_page=True)
        kinds = [k for k, _ in sse(streamed[0])]
        assert "progress" in kinds and kinds[-1] == "done", kinds
        assert page.url.endswith(sse(streamed[0])[-1][1]["url"])
        assert errors == []
        page.close()
    finally:
        server.stop()
