"""The live endpoints against a real model process (sae_core/live/pool.py) over the tiny mined store:
answers, validation (404, 422 with the reason), limits (503 + Retry-After under a saturated pool),
cancellation when the client goes away, weights read from the store, and --no-live."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from app.main import create_app
from sae_core.config import LiveConfig
from sae_core.live.pool import LiveClient
from sae_core.store.schema import RunWeights

LIMITS = LiveConfig(
    live_device="cpu",
    live_model_dtype="float32",
    live_threads=1,
    live_nice=0,  # the test machine runs other work: a niced model process would starve behind it
    live_queue=0,
    live_time_limit=20,
    max_text_tokens=100,
    max_prompt_tokens=40,
    max_new_tokens_limit=400,
    max_interventions=3,
)
TEXT = "The cat sat over the big red house. Then the king said that the whale ran."


def wait_ready(client, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get("/api/v1/live").json()
        if status["state"] == "ready":
            return status
        assert status["state"] in ("loading", "starting"), status
        time.sleep(0.2)
    raise AssertionError(f"the model process did not become ready: {status}")


@pytest.fixture(scope="module")
def live(mined_store):
    with TestClient(create_app(mined_store, live_config=LIMITS)) as client:
        wait_ready(client)
        yield client


def test_start_up_loads_the_model_and_meanwhile_live_answers_say_loading(mined_store):
    """The app starts its model process with itself; until the model is loaded the API answers 503 with
    Retry-After and says so, the live pages say "loading" and ask again by themselves, other pages answer."""
    with TestClient(create_app(mined_store, live_config=LIMITS)) as client:
        r = client.post("/api/v1/saes/tiny-sae/activations", json={"text": TEXT})  # the process is still importing torch
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "starting" in r.json()["detail"] or "loading" in r.json()["detail"]
        assert client.get("/api/v1/live").json()["state"] in ("starting", "loading")
        assert "The model is loading" in client.get("/live/status").text
        card = client.post("/saes/tiny-sae/inference/result", data={"text": TEXT, "feature": "3"})
        assert card.status_code == 200 and "The model is loading" in card.text and 'hx-trigger="load delay:' in card.text
        assert 'hx-post="/saes/tiny-sae/inference/result"' in card.text and 'hx-include="#inference-form"' in card.text
        assert client.get("/saes/tiny-sae/features/3").status_code == 200 and client.get("/saes/tiny-sae/steer").status_code == 200
        wait_ready(client)
        assert client.post("/api/v1/saes/tiny-sae/activations", json={"text": TEXT}).status_code == 200
        assert "Feature" in client.post("/saes/tiny-sae/inference/result", data={"text": TEXT, "feature": "3"}).text


def test_the_store_holds_the_weights_the_run_was_mined_with(mined_store, tiny_sae_dir):
    from sae_core.interchange import load_sae, load_sae_bytes

    with create_engine(mined_store).connect() as conn:
        row = conn.execute(select(RunWeights)).one()
    assert row.format == "safetensors" and row.n_bytes == len(row.data)
    stored, folder = load_sae_bytes(bytes(row.data)).sae, load_sae(tiny_sae_dir).sae
    assert all((getattr(stored, n) == getattr(folder, n)).all() for n in ("W_enc", "W_dec", "b_enc", "b_pre"))


def test_activations_endpoint(live):
    r = live.post("/api/v1/saes/tiny-sae/activations", json={"text": TEXT, "feature": 3, "top": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["feature"] == 3 and len(body["feature_acts"]) == len(body["tokens"]) > 10
    assert body["tokens"][0]["skipped"] and not body["tokens"][0]["features"]
    assert any(t["features"] for t in body["tokens"]) and all(len(t["features"]) <= 5 for t in body["tokens"])
    assert "".join(t["text"] for t in body["tokens"]) == TEXT
    assert "etag" not in r.headers and "x-saescope-cache" not in r.headers  # a model answer, not a store read


def test_steer_endpoint_and_its_permalink(live):
    req = {"sae": "tiny-sae", "prompt": "the cat sat", "interventions": [{"feature": 3, "mode": "add", "value": 150}], "max_new_tokens": 12}
    r = live.post("/api/v1/steer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["default"]["token_ids"]) == 12 or body["default"]["stopped"] == "eos"
    assert body["steered"]["token_ids"] != body["default"]["token_ids"] and body["diverges_at"] is not None
    assert body["permalink"].startswith("/saes/tiny-sae/steer?prompt=the+cat+sat&feature=3&mode=add&value=150")
    again = live.post("/api/v1/steer", json=req).json()  # the same request gives the same tokens
    assert again["steered"] == body["steered"] and again["default"] == body["default"]
    sampled = {**req, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    assert live.post("/api/v1/steer", json=sampled).json()["steered"] == live.post("/api/v1/steer", json=sampled).json()["steered"]


@pytest.mark.parametrize(
    "path, body, status, reason",
    [
        ("/api/v1/saes/nope/activations", {"text": "hi"}, 404, "no SAE named 'nope'"),
        ("/api/v1/saes/tiny-sae/activations", {"text": "hi", "feature": 128}, 404, "there is no feature 128"),
        ("/api/v1/saes/tiny-sae/activations", {"text": ""}, 422, "at least 1 character"),
        ("/api/v1/steer", {"sae": "tiny-sae", "prompt": "x", "interventions": [{"feature": 999, "mode": "clamp", "value": 1}]}, 404, "no feature 999"),
        ("/api/v1/steer", {"sae": "tiny-sae", "prompt": "x", "interventions": [{"feature": 1, "mode": "boost", "value": 1}]}, 422, "clamp"),
        ("/api/v1/steer", {"sae": "tiny-sae", "prompt": "x", "max_new_tokens": 401}, 422, "less than or equal to 400"),
        ("/api/v1/steer", {"sae": "tiny-sae", "prompt": "x", "interventions": [{"feature": i, "mode": "add", "value": 1} for i in range(4)]},
         422, "at most 3 items"),
        ("/api/v1/steer", {"sae": "tiny-sae", "prompt": "x", "interventions": [{"feature": 1, "mode": "add", "value": 1e6}]}, 422, "less than"),
        ("/api/v1/steer", {"sae": "tiny-sae", "prompt": "x", "top_p": 0}, 422, "greater than 0"),
    ],
)
def test_bad_input_gets_404_or_422_with_the_reason(live, path, body, status, reason):
    r = live.post(path, json=body)
    assert r.status_code == status, r.text
    assert reason in json.dumps(r.json()["detail"])


def test_the_openapi_document_states_this_servers_caps(live):
    """Every request the schema admits is answered: the caps that LiveConfig sets per server are in it."""
    schemas = live.get("/openapi.json").json()["components"]["schemas"]
    steer = schemas["SteerRequest"]["properties"]
    assert steer["max_new_tokens"]["maximum"] == LIMITS.max_new_tokens_limit == 400
    assert steer["interventions"]["maxItems"] == LIMITS.max_interventions == 3
    assert schemas["ActivationsRequest"]["properties"]["text"]["maxLength"] >= 1000
    at_the_caps = {"sae": "tiny-sae", "prompt": "the cat " * 60, "max_new_tokens": 400, "temperature": 1e-300,
                   "interventions": [{"feature": 3, "mode": "clamp", "value": 5}, {"feature": 3, "mode": "add", "value": -999999.5},
                                     {"feature": 127, "mode": "scale", "value": 0}]}
    r = live.post("/api/v1/steer", json=at_the_caps)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_truncated"] > 0 and len(r.json()["prompt_tokens"]) == LIMITS.max_prompt_tokens


def test_a_text_past_the_token_cap_is_read_up_to_it(live):
    r = live.post("/api/v1/saes/tiny-sae/activations", json={"text": "the cat " * 200})
    assert r.status_code == 200, r.text
    assert len(r.json()["tokens"]) == LIMITS.max_text_tokens and r.json()["truncated"] > 0
    assert live.post("/api/v1/saes/tiny-sae/activations", json={"text": TEXT}).json()["truncated"] == 0
    page = live.post("/saes/tiny-sae/inference/result", data={"text": "the cat " * 200, "feature": ""})
    assert f"{LIMITS.max_text_tokens} tokens (the text's first: " in page.text


def long_generation(live, results):
    req = {"sae": "tiny-sae", "prompt": "the cat", "interventions": [{"feature": 3, "mode": "add", "value": 40}], "max_new_tokens": 400}
    results.append(live.post("/api/v1/steer", json=req))


def test_a_saturated_pool_answers_503_with_retry_after_and_pages_keep_working(live):
    results: list = []
    worker = threading.Thread(target=long_generation, args=(live, results))
    worker.start()
    deadline = time.time() + 10
    while live.get("/api/v1/live").json()["pending"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    busy = live.post("/api/v1/saes/tiny-sae/activations", json={"text": "the cat"})
    page = live.get("/saes/tiny-sae/features/3")  # a read-only page while the model is busy
    worker.join()
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.text
    assert page.status_code == 200
    assert results[0].status_code == 200
    assert live.get("/api/v1/live").json()["rejected"] >= 1


def test_a_client_that_goes_away_cancels_its_generation(live):
    socket_path = live.app.state.live.client.socket_path
    before = live.get("/api/v1/live").json()

    async def leave_after(seconds):
        start = time.monotonic()

        async def gone():
            return time.monotonic() - start > seconds

        request = {"op": "generate", "sae": "tiny-sae", "prompt": "the cat", "interventions": [[3, "add", 40.0]],
                   "settings": {"max_new_tokens": 400, "temperature": 0.0, "top_p": 1.0, "seed": 0}}
        with pytest.raises(Exception, match="ClientGone|^$"):
            await LiveClient(socket_path, poll=0.05).call(request, gone)

    asyncio.run(leave_after(0.05))  # well inside the ~0.4 s two 400-token continuations take on a quiet machine
    deadline = time.time() + 10
    while (now := live.get("/api/v1/live").json())["pending"] and time.time() < deadline:
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1 and now["pending"] == 0


def test_a_generation_stops_at_the_time_limit(mined_store):
    limits = LiveConfig(**{**LIMITS.__dict__, "live_time_limit": 0.1})  # well under the ~0.4 s the request needs
    with TestClient(create_app(mined_store, live_config=limits)) as client:
        wait_ready(client)
        req = {"sae": "tiny-sae", "prompt": "the cat", "interventions": [{"feature": 3, "mode": "add", "value": 40}], "max_new_tokens": 400}
        body = client.post("/api/v1/steer", json=req).json()
    assert "time_limit" in (body["default"]["stopped"], body["steered"]["stopped"])


def test_without_live_the_live_endpoints_say_why_and_pages_work(mined_store, monkeypatch):
    from app.config import AppConfig
    from app.live import LiveLink

    config = AppConfig.resolve(mined_store, live=LiveLink.none("this server was started with --no-live"))  # what serve --no-live gives
    with TestClient(create_app(config=config)) as client:
        r = client.post("/api/v1/saes/tiny-sae/activations", json={"text": "the cat"})
        assert r.status_code == 503 and "--no-live" in r.json()["detail"]
        assert client.get("/api/v1/live").json()["state"] == "off"
        assert "--no-live" in client.get("/live/status").text
        assert client.get("/saes/tiny-sae/features/3").status_code == 200
        fragment = client.post("/saes/tiny-sae/features/3/try", data={"text": "the cat"})
        assert fragment.status_code == 200 and "--no-live" in fragment.text and 'data-status="503"' in fragment.text


def test_a_model_that_cannot_load_is_reported_and_pages_keep_working(mined_store, tmp_path):
    import sqlite3

    copy = tmp_path / "store.db"
    sqlite3.connect(mined_store.removeprefix("sqlite:///")).backup(sqlite3.connect(copy))  # WAL: copy through SQLite
    engine = create_engine(f"sqlite:///{copy}")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE models SET name = '/nonexistent/model-dir'")
    with TestClient(create_app(f"sqlite:///{copy}", live_config=LIMITS)) as client:
        deadline = time.time() + 30
        while (status := client.get("/api/v1/live").json())["state"] in ("loading", "starting") and time.time() < deadline:
            time.sleep(0.1)
        assert status["state"] == "error" and "could not be loaded" in status["detail"]
        r = client.post("/api/v1/saes/tiny-sae/activations", json={"text": "the cat"})
        assert r.status_code == 503 and "could not be loaded" in r.json()["detail"]
        assert "could not be loaded" in client.get("/live/status").text
        assert client.get("/saes/tiny-sae/features/3").status_code == 200


def test_postgres_store_serves_the_live_sae_without_its_folder(pg_url, tiny_sae_dir, tiny_lm, tmp_path):
    """As in docker-compose: the server has the database only, not the folder the SAE was mined from."""
    import shutil

    from conftest import mine_tiny
    from sae_core.live.runtime import LiveRuntime
    from sae_core.store import db
    from sae_core.store.weights import load_run_sae

    folder = shutil.copytree(tiny_sae_dir, tmp_path / "elsewhere")
    mine_tiny(folder, tiny_lm, pg_url, windows=32)
    shutil.rmtree(folder)  # the training machine's disk is gone
    engine = db.open_store(pg_url)
    with engine.connect() as conn:
        run, loaded = load_run_sae(conn, "elsewhere")
    assert run.source == "store" and loaded.sae.cfg.n_latents == 128
    result = LiveRuntime(LIMITS, engine=engine, lm=tiny_lm).encode("elsewhere", TEXT, feature=3)
    assert result.run_id == run.run_id and len(result.feature_acts) == len(result.tokens)
