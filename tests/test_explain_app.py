"""Explanations in the pages and the API, and search by meaning, over a real mined and explained store:
patterns shown with escaped tokens and their scores, the SAE table's explanation column sorted by
score, the N2G metric on the SAE page, /search and /api/v1/search ranking features by explanation."""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, update

from app.main import create_app
from sae_core.config import ExplainConfig
from sae_core.explain.stage import explain
from sae_core.store.schema import Explanation, Vocab

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def explained(mined_store, tmp_path_factory):
    """A copy of the mined store, explained, with the activating token of one pattern renamed to an XSS payload."""
    folder = tmp_path_factory.mktemp("explained")
    src, dst = sqlite3.connect(mined_store.removeprefix("sqlite:///")), sqlite3.connect(folder / "store.db")
    src.backup(dst)
    src.close()
    dst.close()
    url = f"sqlite:///{folder / 'store.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAESCOPE_HOME", str(folder / "home"))
        explain("tiny-sae", ExplainConfig(db=url), progress=False)
    engine = create_engine(url)
    with engine.begin() as conn:
        best = conn.execute(
            select(Explanation.feature_index, Explanation.patterns, Explanation.text, Explanation.score)
            .where(Explanation.score.is_not(None))
            .order_by(Explanation.score.desc(), Explanation.feature_index)
        ).first()
        assert best is not None
        token = best.patterns[0]["tokens"][-1]
        conn.execute(update(Vocab).where(Vocab.token_id == token).values(text=XSS))
    engine.dispose()
    return {"url": url, "feature": best.feature_index, "text": best.text, "score": best.score, "home": folder / "home"}


@pytest.fixture(scope="module")
def client(explained):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAESCOPE_HOME", str(explained["home"]))
        with TestClient(create_app(explained["url"])) as c:
            yield c


def test_feature_api_lists_explanations_with_scores(client, explained):
    f = client.get(f"/api/v1/saes/tiny-sae/features/{explained['feature']}").json()
    (e,) = f["explanations"]
    assert e["method"] == "n2g" and e["score"] == pytest.approx(explained["score"])
    assert 0 <= e["precision"] <= 1 and 0 <= e["recall"] <= 1 and e["scores"]["positions"] > 0
    assert e["patterns"][0]["tokens"][-1] == XSS  # token strings, decoded from the ids
    assert all(len(q["tokens"]) == len(q["token_ids"]) for q in e["patterns"])


def test_feature_page_shows_escaped_patterns_and_scores(client, explained):
    html = client.get(f"/saes/tiny-sae/features/{explained['feature']}").text
    assert "N2G patterns" in html and "precision" in html and "recall" in html
    assert XSS not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'class="tok peak"' in html


def test_sae_table_has_explanations_sorted_by_score(client, explained):
    page = client.get("/api/v1/saes/tiny-sae/features?sort=explanation&order=desc&limit=1000").json()
    scores = [f["explanation_score"] for f in page["features"]]
    known = [s for s in scores if s is not None]
    assert known and known == sorted(known, reverse=True)
    assert scores[: len(known)] == known  # unexplained features last
    assert page["features"][0]["explanation"]
    asc = client.get("/api/v1/saes/tiny-sae/features?sort=explanation&order=asc&limit=1000").json()
    asc_known = [f["explanation_score"] for f in asc["features"] if f["explanation_score"] is not None]
    assert asc_known == sorted(asc_known) and asc["features"][-1]["explanation_score"] is None or len(asc_known) == len(scores)
    html = client.get("/saes/tiny-sae?sort=explanation&order=desc").text
    assert "explanation (N2G F1) ▼" in html and XSS not in html


def test_sae_page_and_api_show_the_n2g_metric(client):
    sae = client.get("/api/v1/saes/tiny-sae").json()
    assert sae["metrics"]["n2g_features"] > 0 and 0 <= sae["metrics"]["n2g_recall"] <= 1
    assert "N2G explainability" in client.get("/saes/tiny-sae").text


def test_search_ranks_a_feature_by_its_own_explanation(client, explained):
    words = explained["text"].replace("|", " ").replace("*", " ")
    r = client.get("/api/v1/search", params={"q": words, "sae": "tiny-sae"}).json()
    assert r["features"], r
    top = r["features"][:5]
    assert explained["feature"] in [h["index"] for h in top]
    hit = next(h for h in top if h["index"] == explained["feature"])
    assert hit["semantic_rank"] is not None and hit["cosine"] > 0.5
    html = client.get("/search", params={"q": words}).text
    assert "By meaning" in html and f"tiny-sae #{explained['feature']}" in html and XSS not in html


def test_search_that_matches_nothing_says_so(client):
    r = client.get("/api/v1/search", params={"q": "zzqx"}).json()
    assert r["hits"] == [] and all(h["full_text_rank"] is None for h in r["features"])


def test_explanations_and_search_in_a_browser(explained):
    """Chromium on a live server: the explanations block, the table's explanation sort and the search page
    render with no script run, no CSP violation and the XSS token shown as text."""
    from test_browser import ARTIFACTS, CHROMIUM

    from conftest import LiveServer

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt)")
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAESCOPE_HOME", str(explained["home"]))
        live = LiveServer(create_app(explained["url"]))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page()
                errors, dialogs = [], []
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(f"{live.url}/saes/tiny-sae/features/{explained['feature']}")
                patterns = page.locator(".explanations table.patterns td.pattern")
                assert patterns.count() >= 1 and XSS.replace(" ", "·") in patterns.first.inner_text()  # spaces drawn visibly
                page.goto(f"{live.url}/saes/tiny-sae?sort=explanation&order=desc")
                assert page.locator("td.explanation").first.inner_text().strip()
                page.goto(f"{live.url}/search?q=" + explained["text"].split(" | ")[0].replace("*", ""))
                assert page.locator("table.search-meaning a.hit").count() >= 1
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "explanations_search.png"), full_page=True)
                browser.close()
        finally:
            live.stop()
    assert not dialogs and not errors, (dialogs, errors)
