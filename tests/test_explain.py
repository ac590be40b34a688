"""N2G explanations: planted patterns are recovered with their scores, and `saescope explain` writes,
resumes (after kill -9 too), skips and re-explains with --force, on a real mined store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select

from sae_core.config import ExplainConfig
from sae_core.errors import SaescopeError
from sae_core.explain.base import FeatureContexts
from sae_core.explain.n2g import N2GExplainer, N2GSettings, pattern_key
from sae_core.explain.stage import explain, render_patterns
from sae_core.store.schema import SAE, Explanation, Feature


def planted(rule, n_examples=60, width=16, vocab=40, seed=0) -> FeatureContexts:
    """Random token contexts; the feature's activation at each position is rule(tokens, p) (0 or a value)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(n_examples, width))
    acts = np.array([[rule(row, p) for p in range(width)] for row in tokens], dtype=np.float32)
    return FeatureContexts(0, float(acts.max()), tokens, acts, ["top"] * n_examples, np.arange(n_examples), np.full(n_examples, -1))


def run_n2g(feature, **settings):
    n2g = N2GExplainer(N2GSettings(**settings))
    build, held = feature.split()
    explained = n2g.explain(feature, build)
    return explained, n2g.score(feature, explained, held)


def test_bigram_is_found_and_the_bare_token_is_not():
    # fires on 7 only after 3; 7 elsewhere (and 3 elsewhere) never fires
    def rule(row, p):
        return 5.0 if p > 0 and row[p] == 7 and row[p - 1] == 3 else 0.0

    feature = planted(rule)
    rng = np.random.default_rng(1)
    for e in range(feature.tokens.shape[0]):  # plant the bigram once per context, so every context has a peak
        p = int(rng.integers(2, 16))
        feature.tokens[e, p - 1 : p + 1] = [3, 7]
        feature.tokens[e, (p + 4) % 16] = 7  # and a 7 after something else, which does not fire
    feature.acts = np.array([[rule(row, p) for p in range(16)] for row in feature.tokens], dtype=np.float32)
    explained, scored = run_n2g(feature)
    assert [q["tokens"] for q in explained.patterns] == [[3, 7]]
    assert scored.precision == 1.0 and scored.recall == 1.0 and scored.score == 1.0
    assert scored.scores["firing"] > 0 and scored.scores["positions"] == 30 * 16


def test_wildcard_where_a_position_does_not_matter():
    # fires on 7 when 3 is two tokens before, whatever sits in between
    def rule(row, p):
        return 4.0 if p > 1 and row[p] == 7 and row[p - 2] == 3 else 0.0

    rng = np.random.default_rng(2)
    tokens = rng.integers(8, 40, size=(80, 16))
    for e in range(80):
        p = int(rng.integers(3, 16))
        tokens[e, p - 2], tokens[e, p] = 3, 7
        q = (p + 5) % 14 + 1  # and a 7 without the 3 before it, which must not fire
        if abs(q - p) > 2:
            tokens[e, q] = 7
    acts = np.array([[rule(row, p) for p in range(16)] for row in tokens], dtype=np.float32)
    feature = FeatureContexts(0, float(acts.max()), tokens, acts, ["top"] * 80, np.arange(80), np.full(80, -1))
    explained, scored = run_n2g(feature)
    assert explained.patterns[0]["tokens"] == [3, None, 7]
    assert scored.precision > 0.9 and scored.recall > 0.9


def test_a_feature_that_ignores_tokens_scores_low():
    rng = np.random.default_rng(3)

    def rule(row, p):
        return float(rng.random() < 0.1) * 3.0  # fires at random: no pattern predicts it

    explained, scored = run_n2g(planted(rule, seed=3))
    assert (scored.precision or 0) < 0.4


def test_fire_fraction_sets_what_counts_as_firing():
    def rule(row, p):
        return 10.0 if row[p] == 5 else 2.0 if row[p] == 6 else 0.0

    feature = planted(rule, seed=4)
    explained, _ = run_n2g(feature, fire_fraction=0.5)
    assert [q["tokens"] for q in explained.patterns] == [[5]]
    explained, _ = run_n2g(feature, fire_fraction=0.1)
    assert sorted(q["tokens"] for q in explained.patterns) == [[5], [6]]


def test_pattern_key_matches_the_index_hash():
    from sae_core.explain.n2g import SuffixIndex

    tokens = np.array([[4, 9, 2, 7]])
    index = SuffixIndex(tokens, 4)
    n, mask, h = pattern_key([9, None, 7])
    assert (n, mask) == (3, 0) and int(index.hashes(n, mask)[0][0, 3]) == h


def test_render_patterns_shows_wildcards_and_whitespace():
    vocab = ["a", " whale", "\n", " sperm"]
    assert render_patterns([{"tokens": [3, 1]}, {"tokens": [2, None, 1]}], vocab) == "sperm whale | \\n * whale"


# --- the stage on a real mined store -------------------------------------------------------------


@pytest.fixture
def store(mined_store, tmp_path) -> str:
    """A private copy of the session's mined store (explanations change what its pages show)."""
    src = sqlite3.connect(mined_store.removeprefix("sqlite:///"))
    dst = sqlite3.connect(tmp_path / "copy.db")
    src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{tmp_path / 'copy.db'}"


def counts(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).select_from(Explanation))
        fired = conn.scalar(select(func.count()).select_from(Feature).where(Feature.n_fired > 0))
    engine.dispose()
    return n or 0, fired or 0


def test_explain_writes_skips_and_forces(store):
    first = explain("tiny-sae", ExplainConfig(db=store, features=5, batch_features=2, embed=False), progress=False)
    assert first.explained == 5 and first.skipped == 0
    rest = explain("tiny-sae", ExplainConfig(db=store, embed=False), progress=False)
    n, fired = counts(store)
    assert rest.skipped == 5 and rest.explained == fired - 5 and n == fired
    again = explain("tiny-sae", ExplainConfig(db=store, embed=False), progress=False)
    assert again.explained == 0 and again.skipped == fired
    forced = explain("tiny-sae", ExplainConfig(db=store, embed=False, force=True, features=3), progress=False)
    assert forced.explained == 3 and counts(store)[0] == 3

    engine = create_engine(store)
    with engine.connect() as conn:
        metrics = conn.scalar(select(SAE.metrics))
        rows = conn.execute(select(Explanation)).all()
    assert metrics["fvu"] == 0.31  # eval.json's metrics stay
    assert metrics["n2g_features"] == 3 and 0 <= metrics["n2g_recall"] <= 1
    for r in rows:
        assert r.method == "n2g" and r.text and r.patterns and r.search_text.startswith(r.text.split(" | ")[0].split(" *")[0])
        assert r.scores["positions"] > 0 and (r.precision is None or 0 <= r.precision <= 1)


def test_explain_stores_embeddings(store):
    explain("tiny-sae", ExplainConfig(db=store, features=4), progress=False)
    engine = create_engine(store)
    with engine.connect() as conn:
        blobs = conn.scalars(select(Explanation.embedding)).all()
    assert len(blobs) == 4 and all(b is not None and len(b) == 384 * 2 for b in blobs)
    from sae_core.explain.embed import unpack

    v = unpack(list(blobs))
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-2)


def test_unknown_sae_is_one_clear_error(store):
    with pytest.raises(SaescopeError, match="no SAE named 'nope'.*tiny-sae"):
        explain("nope", ExplainConfig(db=store), progress=False)


def test_kill_9_then_resume(store):
    """A killed `saescope explain` keeps its committed batches; the re-run explains exactly the rest."""
    saescope = str(Path(sys.executable).parent / "saescope")
    cmd = [saescope, "explain", "--sae", "tiny-sae", "--db", store, "--batch-features", "1", "--no-embed"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and counts(store)[0] < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed, fired = counts(store)
    assert 3 <= n_killed < fired, "killed mid-run"
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n, fired = counts(store)
    assert n == fired  # nothing lost, nothing twice (one row per feature and method)
