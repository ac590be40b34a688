"""Search over explanations: full text on SQLite (FTS5) and PostgreSQL (tsvector + GIN) through one
function, with stemming, OR over the words and hostile queries; the FTS index follows deletes; semantic
search ranks by meaning with the real all-MiniLM-L6-v2; reciprocal rank fusion."""

from __future__ import annotations

import sqlite3

import numpy as np

import pytest
from sqlalchemy import delete, insert, select, text

from sae_core.explain.embed import embedder, pack
from sae_core.store import db
from sae_core.store import explanation_search as search
from sae_core.store.schema import SAE, Explanation, MiningRun
from conftest import mine_tiny

TEXTS = {
    1: "whale | sperm whale | harpoon",
    2: 'said | ," he replied | asked',
    3: "Congress | the President | Senate",
    4: "1862 | 1863 | 1864",
}


def _fill(url: str, embed: bool = False) -> int:
    engine = db.open_store(url)
    with engine.begin() as conn:
        run_id = conn.scalar(select(SAE.active_run_id))
        vectors = pack(embedder().encode(list(TEXTS.values()))) if embed else [None] * len(TEXTS)
        conn.execute(
            insert(Explanation),
            [
                dict(run_id=run_id, feature_index=i, method="n2g", text=t, patterns=[], precision=None, recall=None, score=0.5,
                     scores={}, search_text=t.replace("|", " "), embedding=v)
                for (i, t), v in zip(TEXTS.items(), vectors)
            ],
        )
    return run_id


def _check_full_text(url: str) -> None:
    run_id = _fill(url)
    engine = db.open_store(url)
    with engine.connect() as conn:
        def found(q):
            return [m.feature_index for m in search.full_text(conn, run_id, q)]

        assert found("whaling") == [1]  # stemmed: whaling -> whale
        assert found("whales") == [1]
        assert found("senate") == [3] and found("SENATE") == [3]
        assert set(found("harpoon president")) == {1, 3}  # any word
        assert found("replied asked")[0] == 2
        for hostile in ['"', "*", "AND OR NOT", "whale) OR (", "a'b", "NEAR(x y)", ":*", "\\", "whale:*"]:
            search.full_text(conn, run_id, hostile)  # never a syntax error
        assert found("1863") == [4]
        assert found("") == [] and found("!!!") == []
        assert search.full_text(conn, run_id + 999, "whale") == []  # another run's explanations stay out
    with engine.begin() as conn:
        conn.execute(delete(Explanation).where(Explanation.feature_index == 1))
    with engine.connect() as conn:
        assert search.full_text(conn, run_id, "whale") == []
    with engine.begin() as conn:  # a run's deletion cascades to its explanations and their index entries
        conn.execute(delete(MiningRun).where(MiningRun.id == run_id))
    with engine.connect() as conn:
        assert search.full_text(conn, run_id, "senate") == []
        if conn.dialect.name == "sqlite":
            assert conn.scalar(text("SELECT count(*) FROM explanations_fts WHERE explanations_fts MATCH 'senate'")) == 0
    engine.dispose()


@pytest.fixture
def sqlite_store(mined_store, tmp_path) -> str:
    src, dst = sqlite3.connect(mined_store.removeprefix("sqlite:///")), sqlite3.connect(tmp_path / "s.db")
    src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{tmp_path / 's.db'}"


def test_full_text_sqlite(sqlite_store):
    _check_full_text(sqlite_store)


def test_full_text_postgres(pg_url, tiny_sae_dir, tiny_lm):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url, windows=16)
    _check_full_text(pg_url)
    engine = db.open_store(pg_url)
    with engine.connect() as conn:  # the GIN index over the tsvector is there, and the query can use it
        assert conn.scalar(text("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_explanations_fts' AND schemaname = current_schema()")) == 1
    engine.dispose()


def test_semantic_ranks_by_meaning(sqlite_store):
    run_id = _fill(sqlite_store, embed=True)
    engine = db.open_store(sqlite_store)
    with engine.connect() as conn:
        def ranked(q):
            return [m.feature_index for m in search.semantic(conn, run_id, embedder().encode([q])[0])]

        assert ranked("whaling")[0] == 1
        assert ranked("dialogue attribution")[0] == 2
        assert ranked("the government and its legislature")[0] == 3
        assert ranked("years of the civil war")[0] == 4
        matches = search.semantic(conn, run_id, embedder().encode(["whaling"])[0], limit=2)
        assert len(matches) == 2 and matches[0].score > matches[1].score
    with engine.begin() as conn:  # a new explanation changes the SAE's revision: the in-memory index follows
        conn.execute(text("UPDATE saes SET revision = revision + 1"))
        conn.execute(delete(Explanation).where(Explanation.feature_index == 1))
    with engine.connect() as conn:
        assert 1 not in [m.feature_index for m in search.semantic(conn, run_id, embedder().encode(["whaling"])[0])]
    engine.dispose()


def test_fuse_adds_reciprocal_ranks():
    a = [search.Match(5, "n2g", 1.0), search.Match(7, "n2g", 0.5)]
    b = [search.Match(7, "n2g", 0.9), search.Match(9, "n2g", 0.8), search.Match(7, "llm", 0.7)]
    fused = dict(search.fuse(a, b))
    assert fused[7] == pytest.approx(1 / 62 + 1 / 61) and fused[5] == pytest.approx(1 / 61) and fused[9] == pytest.approx(1 / 62)
    assert [i for i, _ in search.fuse(a, b)] == [7, 5, 9]


def test_explain_and_search_on_postgres(pg_url, tiny_sae_dir, tiny_lm):
    """The whole path on PostgreSQL: explain writes (JSON patterns, embeddings, the GIN-indexed text), the
    SAE's metrics take the means, and search finds a feature by a word of its explanation."""
    from sae_core.config import ExplainConfig
    from sae_core.explain.stage import NO_PATTERN, explain

    mine_tiny(tiny_sae_dir, tiny_lm, pg_url, windows=16)
    result = explain("tiny-sae", ExplainConfig(db=pg_url), progress=False)
    assert result.explained > 0 and result.metrics["n2g_features"] == result.explained
    engine = db.open_store(pg_url)
    with engine.connect() as conn:
        index, words = conn.execute(
            select(Explanation.feature_index, Explanation.search_text).where(Explanation.text != NO_PATTERN)
            .order_by(Explanation.feature_index).limit(1)
        ).one()
        run_id = conn.scalar(select(SAE.active_run_id))
        word = next(w for w in search.words(words) if len(w) > 2)
        assert index in [m.feature_index for m in search.full_text(conn, run_id, word, limit=500)]
        nearest = search.semantic(conn, run_id, embedder().encode([words])[0], limit=5)
        assert index in [m.feature_index for m in nearest]
    engine.dispose()


def _clustered(n: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres, as sentence embeddings of related explanations gather."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, 384)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.05 * rng.standard_normal((n, 384)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_inverted_file_index_finds_what_exact_search_finds(monkeypatch):
    """Above EXACT_MAX a run is searched through faiss's IVF index, scanning about SCAN_ROWS embeddings:
    on clustered vectors its top 10 are mostly the exact top 10, best first, from a tenth of the rows."""
    monkeypatch.setattr(search, "SCAN_ROWS", 1024)
    matrix = _clustered(20_000, 200, seed=0)
    keys = [(i, "n2g") for i in range(len(matrix))]
    exact, indexed = search.RunEmbeddings(keys, matrix), search.RunEmbeddings(keys, None, search.build_ivf(matrix))
    assert indexed.ivf.nprobe * len(matrix) / indexed.ivf.nlist < 0.1 * len(matrix)   # a tenth of the rows or less
    recalls = []
    for q in _clustered(50, 200, seed=1):
        want, got = exact.nearest(q, 10), indexed.nearest(q, 10)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        recalls.append(len({r for r, _ in want} & {r for r, _ in got}) / 10)
    assert np.mean(recalls) >= 0.8   # 0.85 here: k-means lists split some of the 200 clusters


def test_a_large_run_is_searched_through_the_index(sqlite_store, monkeypatch):
    run_id = _fill(sqlite_store, embed=True)
    monkeypatch.setattr(search, "EXACT_MAX", 2)   # the filled run has more explanations than that
    monkeypatch.setattr(search, "EMBEDDINGS", search.EmbeddingIndex())
    engine = db.open_store(sqlite_store)
    with engine.connect() as conn:
        assert search.EMBEDDINGS.get(conn, run_id).ivf is not None
        assert search.semantic(conn, run_id, embedder().encode(["whaling"])[0])[0].feature_index == 1
    engine.dispose()


def test_start_up_loads_search_by_meaning_in_the_background_while_pages_answer(sqlite_store, monkeypatch):
    """The app's start-up loads the run's embeddings and the embedding model in a thread; pages answer
    while it loads, and a search by meaning that arrives meanwhile waits for it, then ranks by meaning."""
    import threading

    from fastapi.testclient import TestClient

    from app.main import create_app
    from sae_core.explain import embed

    run_id = _fill(sqlite_store, embed=True)
    monkeypatch.setattr(embed, "_loaded", None)  # as in a fresh server process: the model is not loaded yet
    embed._loading.acquire()  # hold the model's load where it starts, to look at the server during it
    try:
        app = create_app(sqlite_store)
        with TestClient(app) as client:
            warm_up = app.state.meaning
            assert warm_up.thread is not None and warm_up.thread.is_alive() and not warm_up.done.is_set()
            assert client.get("/").status_code == 200 and client.get("/saes/tiny-sae/features/3").status_code == 200
            answers: list = []
            searcher = threading.Thread(target=lambda: answers.append(client.get("/api/v1/search", params={"q": "ocean animals"})))
            searcher.start()
            searcher.join(0.5)
            assert searcher.is_alive() and not answers  # waiting for the model, without holding the event loop:
            assert client.get("/api/v1/saes/tiny-sae").status_code == 200  # another request is served meanwhile
            embed._loading.release()
            searcher.join(60)
            assert warm_up.done.is_set() and warm_up.error is None and embed.embedder_loaded()
            assert any(key[1] == run_id for key in search.EMBEDDINGS._by_key)  # the run's index was built at start-up
            hits = answers[0].json()["features"]
            assert answers[0].status_code == 200 and hits[0]["index"] == 1 and hits[0]["semantic_rank"] == 1
    finally:
        if embed._loading.locked() and not embed.embedder_loaded():
            embed._loading.release()
