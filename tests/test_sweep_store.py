"""Stored sweeps (issue 30 item 3): a sweep that finishes is written to the store's `sweeps` table by the
process that ran it, the same request is then answered from there without running the model, and a new
app over the store (the live features off: no model process at all) shows it on the permalink's page and
from GET /api/v1/sweeps/{key}; on SQLite and PostgreSQL. The permalink is faithful (an explicitly empty
held-out set, conditions, exact numbers and verbatim prompts round-trip to the same request and key), and
the API takes a conditional sweep and stores it through the model process."""

from __future__ import annotations

import sqlite3
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import mine_tiny
from fastapi.testclient import TestClient
from test_live_api import LIMITS, wait_ready

from app.live.pages import _sweep_request
from app.main import create_app
from sae_core.config import LiveConfig
from sae_core.live.interventions import Condition, Intervention
from sae_core.live.runtime import LiveRuntime
from sae_core.live.sweep import SweepRequest, sweep_permalink
from sae_core.store import db

CONDITIONAL = Intervention(3, "add", 1.0, Condition("generated"))


def _copy(mined_store: str, tmp_path) -> str:
    copy = tmp_path / "store.db"
    with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)  # WAL mode: a file copy could miss what the log still holds
    return f"sqlite:///{copy}"


def _reopened(link: str, limits: LiveConfig = LIMITS) -> SweepRequest:
    """What the sweep page rebuilds from a permalink's query (pages._sweep_request, as sweep_page calls it)."""
    parts = urlsplit(link)
    q = parse_qs(parts.query, keep_blank_values=True)
    one = lambda name, default="": q.get(name, [default])[0]  # noqa: E731
    sae = parts.path.split("/")[2]
    return _sweep_request(
        sae, one("intervention"), q.get("strength", []), [one("prompts")], q.get("heldout", []), one("target_feature"),
        one("target_token"), int(one("max_new_tokens", "32")), float(one("max_cost_increase", "1")), limits,
        bool(one("no_heldout")), q.get("prompt", []),
    )  # fmt: skip


@pytest.mark.parametrize(
    "request_",
    [
        SweepRequest("tiny-sae", CONDITIONAL, (10.0, 40.0), ("the cat sat",), (), max_new_tokens=6),
        SweepRequest("tiny-sae", CONDITIONAL, (10.0,), None, None),
        SweepRequest(
            "tiny-sae", Intervention(3, "cap", 2.0, Condition("feature", 5, 0.1234567)), (1.2345678, 0.1), ("the cat ", "  a\tking"),
            ("the whale ran",), target_feature=7, max_new_tokens=9, max_cost_increase=0.3333333,
        ),  # fmt: skip
        SweepRequest("tiny-sae", Intervention(3, "scale", 1.0), (2.0,), None, (), target_token=" the"),
    ],
    ids=["empty-heldout", "builtin", "exact-numbers-verbatim-prompts", "token-no-heldout"],
)
def test_the_permalink_reopens_the_same_request(request_):
    link = sweep_permalink(request_)
    again = _reopened(link)
    assert again == request_ and again.key() == request_.key(), link
    assert ("no_heldout=1" in link) == (request_.heldout == ())


def test_an_empty_heldout_differs_from_the_builtin_one():
    empty = SweepRequest("tiny-sae", CONDITIONAL, (10.0,), None, ())
    builtin = SweepRequest("tiny-sae", CONDITIONAL, (10.0,), None, None)
    assert empty.key() != builtin.key() and _reopened(sweep_permalink(empty)).heldout == ()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, mined_store, tiny_sae_dir, tiny_lm, tmp_path):
    if request.param == "sqlite":
        return _copy(mined_store, tmp_path)
    url = request.getfixturevalue("pg_url")
    mine_tiny(tiny_sae_dir, tiny_lm, url)
    return url


def test_a_stored_sweep_is_read_back_without_the_model(store_url, tiny_lm):
    engine = db.open_store(store_url)
    runtime = LiveRuntime(LiveConfig(max_new_tokens_limit=64), engine=engine, lm=tiny_lm)
    request = SweepRequest("tiny-sae", CONDITIONAL, (10.0, 40.0), ("the cat sat", "then the king said"), (), max_new_tokens=6)
    first = runtime.sweep(request)
    assert not first.stored and first.stopped is None and first.computed_at
    ticks: list = []
    again = LiveRuntime(LiveConfig(max_new_tokens_limit=64), engine=engine, lm=tiny_lm).sweep(request, progress=ticks.append)
    assert again.stored and not ticks, "a stored sweep is read, not run (no progress: no token generated)"
    assert again.points == first.points and again.baseline == first.baseline and again.computed_at == first.computed_at
    engine.dispose()

    # a new app over the store, the live features off: no model process can answer
    with TestClient(create_app(store_url)) as client:
        assert client.get("/api/v1/live").json()["state"] == "off"
        api = client.get(f"/api/v1/sweeps/{request.key()}")
        assert api.status_code == 200, api.text
        body = api.json()
        assert body["stored"] and body["key"] == request.key() and body["permalink"] == sweep_permalink(request)
        assert [p["token_ids"] for p in body["points"]] == [p.token_ids for p in first.points]
        assert [p["lift"] for p in body["points"]] == [p.lift for p in first.points]  # the very numbers, not a rerun
        assert body["computed_at"].startswith(first.computed_at[:16])
        page = client.get(sweep_permalink(request))
        assert page.status_code == 200 and "data-autostart" not in page.text, page.text
        assert page.text.count("<svg") == 2 and "Stored sweep, computed" in page.text and 'data-done="true"' in page.text
        assert "Cache-Control" not in page.headers or "max-age" not in page.headers["Cache-Control"]
        other = client.get(sweep_permalink(SweepRequest("tiny-sae", CONDITIONAL, (10.0, 41.0), ("the cat sat", "then the king said"), ())))
        assert other.status_code == 200 and "data-autostart" in other.text and "Stored sweep" not in other.text
        missing = client.get("/api/v1/sweeps/0123456789abcdef01234567")
        assert missing.status_code == 404 and "no sweep" in missing.json()["detail"]


def test_the_api_takes_a_conditional_sweep_and_the_model_process_stores_it(mined_store, tmp_path):
    url = _copy(mined_store, tmp_path)
    body = {"sae": "tiny-sae", "intervention": "3:add:1@gen", "strengths": [10, 40], "prompts": ["the cat sat"], "heldout": [],
            "max_new_tokens": 6}  # fmt: skip
    with TestClient(create_app(url, live_config=LIMITS)) as client:
        wait_ready(client)
        r = client.post("/api/v1/sweep", json=body)
        assert r.status_code == 200, r.text
        first = r.json()
        assert not first["stored"] and first["request"]["intervention"] == "3:add:1@gen" and first["request"]["heldout"] == []
        assert "no_heldout=1" in first["permalink"]
        again = client.post("/api/v1/sweep", json=body).json()
        assert again["stored"] and again["points"] == first["points"]
        for condition in ("3:add:1@prompt", "3:cap:2@5>0.5", "3:ortho:0.5@tiny-sae:5>1e-3"):
            assert client.post("/api/v1/sweep", json={**body, "intervention": condition}).status_code == 200, condition
        bad = client.post("/api/v1/sweep", json={**body, "intervention": "3:add:1@sometimes"})
        assert bad.status_code == 422
    with TestClient(create_app(url)) as client:  # live off
        stored = client.get(f"/api/v1/sweeps/{first['key']}").json()
        assert stored["points"] == first["points"] and stored["stored"]
        page = client.get(first["permalink"])
        assert "Stored sweep, computed" in page.text and "data-autostart" not in page.text
