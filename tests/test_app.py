"""The feature browser and the REST API over a real mined store (tiny model), on SQLite and PostgreSQL."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.orm import Session

from app import deps, schemas
from app.main import create_app
from sae_core.errors import SaescopeError
from sae_core.store import db
from sae_core.store.schema import SAE, Example, Feature, Vocab, unpack_ids
from conftest import mine_tiny

XSS = "<script>alert(1)</script>"


def plant_tokens(url: str) -> dict:
    """Rename the peak token of feature 0's best context to an XSS payload, and another token to a newline."""
    engine = db.make_engine(url)
    with Session(engine) as s, s.begin():
        run, model_id = s.execute(select(SAE.active_run_id, SAE.model_id)).one()
        feature = s.scalar(select(Feature.index).where(Feature.run_id == run, Feature.n_fired > 0).order_by(Feature.index).limit(1))
        ex = s.scalars(select(Example).where(Example.run_id == run, Example.feature_index == feature, Example.kind == "top", Example.rank == 0)).one()
        ids = unpack_ids(ex.token_ids)
        peak = ids[ex.max_pos]
        other = next(t for t in ids if t != peak)
        s.execute(update(Vocab).where(Vocab.model_id == model_id, Vocab.token_id == peak).values(text=XSS))
        s.execute(update(Vocab).where(Vocab.model_id == model_id, Vocab.token_id == other).values(text="a\nb"))
    engine.dispose()
    return {"feature": feature, "peak": peak}


@pytest.fixture(scope="module")
def planted(mined_store):
    return plant_tokens(mined_store)


@pytest.fixture(scope="module")
def client(mined_store, planted):
    with TestClient(create_app(mined_store)) as c:
        yield c


def test_home_and_sae_pages(client):
    home = client.get("/")
    assert home.status_code == 200 and "tiny-sae" in home.text and "80.0%" in home.text   # CE recovered from eval.json
    page = client.get("/saes/tiny-sae")
    assert page.status_code == 200 and "<html" in page.text and 'name="index"' in page.text
    fragment = client.get("/saes/tiny-sae?sort=density&order=desc", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text and "features" in fragment.text
    jump = client.get("/saes/tiny-sae/jump?index=7", follow_redirects=False)
    assert jump.status_code == 303 and jump.headers["location"] == "/saes/tiny-sae/features/7"
    assert client.get("/tiny-sae/7", follow_redirects=False).headers["location"] == "/saes/tiny-sae/features/7"


def test_feature_page_shows_everything_and_escapes_tokens(client, planted):
    html = client.get(f"/saes/tiny-sae/features/{planted['feature']}").text
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html   # inert, yet visible
    assert '<span class="ws">↵</span><br>' in html                                 # a newline is shown, not swallowed
    assert '<svg class="hist"' in html and "count (log)" in html and ">activation<" in html
    assert html.count('class="context"') >= 1 and re.search(r'class="tok( peak)? h\d+"', html) and 'class="tok peak' in html
    assert len(re.findall(r'class="neighbour" href="/saes/tiny-sae/features/\d+"', html)) == 10
    assert "promotes" in html and "suppresses" in html and "Copy link" in html
    assert 'hx-get="/saes/tiny-sae/features/%d/examples?kind=interval' % planted["feature"] in html
    intervals = client.get(f"/saes/tiny-sae/features/{planted['feature']}/examples?kind=interval&limit=500").text
    assert "of activations" in intervals and XSS not in intervals


def test_api_shapes_paging_sorting_filters(client):
    models = client.get("/api/v1/models").json()
    assert models[0]["saes"][0]["name"] == "tiny-sae" and models[0]["vocab_size"] > 0
    sae = client.get("/api/v1/saes/tiny-sae").json()
    assert sae["n_latents"] == 128 and sae["k"] == 6 and sae["metrics"]["fvu"] == 0.31 and sae["mining"]["tokens"] == 96 * 31
    page = client.get("/api/v1/saes/tiny-sae/features?offset=10&limit=5").json()
    assert page["total"] == 128 and [f["index"] for f in page["features"]] == [10, 11, 12, 13, 14]
    dens = [f["density"] for f in client.get("/api/v1/saes/tiny-sae/features?sort=density&order=desc&limit=128").json()["features"]]
    assert dens == sorted(dens, reverse=True)
    alive = client.get("/api/v1/saes/tiny-sae/features?filter=alive&limit=1000").json()
    dead = client.get("/api/v1/saes/tiny-sae/features?filter=dead&limit=1000").json()
    assert alive["total"] + dead["total"] == 128 and all(f["n_fired"] > 0 for f in alive["features"])
    rare = client.get("/api/v1/saes/tiny-sae/features?filter=rare").json()
    assert all(0 < f["density"] < 1e-4 for f in rare["features"])
    idx = alive["features"][0]["index"]
    feat = client.get(f"/api/v1/saes/tiny-sae/features/{idx}").json()
    assert len(feat["histogram"]["counts"]) == 10 and len(feat["logits_top"]) == 10 and len(feat["neighbours"]) == 10
    top = client.get(f"/api/v1/saes/tiny-sae/features/{idx}/examples?kind=top&limit=3").json()
    assert top["total"] <= 8 and len(top["examples"]) == min(3, top["total"])
    values = [e["max_act"] for e in top["examples"]]
    assert values == sorted(values, reverse=True)
    ex = top["examples"][0]
    assert len(ex["tokens"]) == len(ex["token_ids"]) == len(ex["acts"]) == 9 and ex["doc_id"].endswith(".txt")
    rest = client.get(f"/api/v1/saes/tiny-sae/features/{idx}/examples?kind=top&offset=1&limit=2").json()
    assert [e["rank"] for e in rest["examples"]] == [1, 2][:len(rest["examples"])]
    inter = client.get(f"/api/v1/saes/tiny-sae/features/{idx}/examples?kind=interval&limit=100").json()
    for page in (top, rest, inter):     # the examples endpoint returns plain dicts: they must be its documented shape
        assert schemas.ExamplePage.model_validate(page).model_dump(mode="json") == page
    assert all(e["kind"] == "interval" and 0 <= e["interval"] < 4 for e in inter["examples"])


def test_search_finds_features_by_peak_token(client, planted):
    hits = client.get("/api/v1/search", params={"q": "script"}).json()["hits"]
    assert any(h["index"] == planted["feature"] and h["token"] == XSS for h in hits)
    page = client.get("/search", params={"q": "<script>"}).text
    assert XSS not in page and f"/saes/tiny-sae/features/{planted['feature']}" in page
    assert client.get("/api/v1/search", params={"q": "no-such-token-anywhere"}).json()["hits"] == []


@pytest.mark.parametrize("path,status", [
    ("/api/v1/saes/nope", 404), ("/api/v1/saes/tiny-sae/features/128", 404), ("/api/v1/saes/tiny-sae/features/-1", 422),
    ("/api/v1/saes/tiny-sae/features/abc", 422), ("/api/v1/saes/tiny-sae/features?limit=0", 422),
    ("/api/v1/saes/tiny-sae/features?sort=evil", 422), ("/api/v1/saes/tiny-sae/features?filter=zombie", 422),
    ("/api/v1/saes/tiny-sae/features/1/examples?kind=bottom", 422), ("/api/v1/saes/tiny-sae/features/1/examples?offset=-5", 422),
    ("/api/v1/saes/tiny-sae/features/99999999999999999999", 422), ("/api/v1/search", 422), ("/api/v1/search?q=" + "x" * 101, 422),
    ("/saes/nope", 404), ("/saes/tiny-sae/features/500", 404), ("/saes/tiny-sae/features/x", 422), ("/saes/tiny-sae?offset=-1", 422),
    ("/saes/tiny-sae/jump?index=", 422), ("/saes/tiny-sae/jump?index=9999", 404), ("/no/such/page/here", 404),
    ("/saes/%3Cscript%3E", 404), ("/saes/tiny-sae/features/1/examples?limit=100000", 422),
])
def test_bad_input_is_a_clear_4xx_never_a_500(client, path, status):
    response = client.get(path)
    assert response.status_code == status, response.text
    if path.startswith("/api/"):
        assert response.headers["content-type"].startswith("application/json") and response.json()["detail"]
    else:
        assert "text/html" in response.headers["content-type"] and "<script>" not in response.text.split("</head>")[1]


def test_refuses_to_start_on_an_old_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    with pytest.raises(db.SchemaOutOfDate, match="has no saescope schema: run `saescope db upgrade`"):
        create_app(url)
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(db.SchemaOutOfDate, match="at schema revision 0000"):
        create_app(url)


@pytest.mark.parametrize("threads", ["0", "4"], ids=["reads-on-loop", "reads-in-threads"])
def test_api_on_postgres(tiny_sae_dir, tiny_lm, request, monkeypatch, threads):
    url = request.getfixturevalue("pg_url")
    mine_tiny(tiny_sae_dir, tiny_lm, url)
    monkeypatch.setenv(deps.ENV_DB_THREADS, threads)
    app = create_app(url)
    assert (app.state.reader.limiter is None) == (threads == "0")
    with TestClient(app) as c:
        assert c.get("/api/v1/saes/tiny-sae").json()["n_latents"] == 128
        feats = c.get("/api/v1/saes/tiny-sae/features?sort=max_act&order=desc&limit=3").json()["features"]
        assert feats[0]["max_act"] >= feats[1]["max_act"] >= feats[2]["max_act"]
        page = c.get(f"/saes/tiny-sae/features/{feats[0]['index']}")
        assert page.status_code == 200 and '<svg class="hist"' in page.text
        assert c.get("/api/v1/search", params={"q": "e"}).json()["hits"]
        # A server restart drops every connection; the next request still answers (on the loop: the
        # long-lived connection is replaced; in threads: the pool's pre-ping).
        with create_engine(url).begin() as admin:
            admin.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = :name"), {"name": db.APPLICATION_NAME})
        assert c.get("/api/v1/saes/tiny-sae").status_code == 200


def test_reads_run_on_the_loop_only_for_a_local_database(monkeypatch):
    monkeypatch.delenv(deps.ENV_DB_THREADS, raising=False)
    local = ["sqlite:///x.db", "postgresql://u@127.0.0.1/db", "postgresql://u@localhost:5432/db", "postgresql:///db",
             "postgresql://u@/db?host=/var/run/postgresql"]
    for url in local:
        assert deps.db_threads(create_engine(url)) == 0, url
    assert deps.db_threads(create_engine("postgresql://u@db.example.org/db")) == deps.REMOTE_DB_THREADS
    monkeypatch.setenv(deps.ENV_DB_THREADS, "2")
    assert deps.db_threads(create_engine("sqlite:///x.db")) == 2
    monkeypatch.setenv(deps.ENV_DB_THREADS, "-1")
    with pytest.raises(SaescopeError, match="whole number"):
        deps.db_threads(create_engine("sqlite:///x.db"))
