"""Mining into the store: results checked against a brute-force pass, SQLite and PostgreSQL, kill -9
resume, atomic re-mining, and bad input."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from sae_core import corpus as corpus_mod
from sae_core.errors import SaescopeError
from sae_core.feature_stats import StatsConfig
from sae_core.interchange import load_sae
from sae_core.mine import MineConfig, mine
from sae_core.model import load_model
from sae_core.store import db
from sae_core.store.schema import SAE, Example, Feature, MiningRun, TokenFeature, unpack_acts, unpack_ids

from conftest import cli_at, threads_env

WINDOWS = 96
CONTEXT = 32


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm


@pytest.fixture(scope="module")
def sae_dir(tiny_sae_dir):
    return tiny_sae_dir


def small(db_url: str, **kw) -> MineConfig:
    stats = StatsConfig(top_n=8, n_intervals=4, per_interval=3, histogram_bins=10, context_before=5, context_after=3)
    kw.setdefault("tokens", CONTEXT * WINDOWS)
    kw.setdefault("model_dtype", "float32")
    return MineConfig(stats=stats, batch_size=8, windows_per_chunk=16, db=db_url, device="cpu", **kw)


def brute_force(lm, sae_dir):
    """Every window's dense SAE code, computed the plain way."""
    sae, cfg = load_sae(sae_dir)
    cache = cfg["metadata"]["saescope"]["cache"]
    corpus = corpus_mod.open_corpus(cache["corpus"])
    wins = [w for _, w in zip(range(WINDOWS), corpus_mod.iter_windows(corpus, lm.tokenizer, CONTEXT, cache["seed"]))]
    tokens = np.concatenate([w.tokens for w in wins])
    with torch.no_grad():
        x = lm.residuals(torch.from_numpy(tokens).long(), 1)[:, 1:]
        z = sae.encode(x.float())                       # [windows, 31, n]
    return tokens, np.concatenate([w.doc_offset for w in wins]), corpus, z.numpy()


def stored(url: str) -> dict:
    """The visible run's features and examples, as plain comparable values."""
    engine = db.make_engine(url)
    with Session(engine) as s:
        sae = s.scalars(select(SAE)).one()
        run = sae.active_run_id
        feats = {f.index: (f.n_fired, round(f.max_act, 5), f.histogram["counts"], f.intervals["shares"], f.logits, f.neighbours)
                 for f in s.scalars(select(Feature).where(Feature.run_id == run))}
        exs = sorted((e.feature_index, e.kind, e.interval or -1, e.rank, e.doc_id, e.doc_offset, tuple(unpack_ids(e.token_ids)),
                      tuple(unpack_acts(e.acts)), round(e.max_act, 5), e.max_pos)
                     for e in s.scalars(select(Example).where(Example.run_id == run)))
    engine.dispose()
    return {"features": feats, "examples": exs}


def check_against_brute_force(url, lm, sae_dir):
    tokens, offsets, corpus, z = brute_force(lm, sae_dir)
    n = z.shape[-1]
    fired = (z > 0).reshape(-1, n)
    engine = db.make_engine(url)
    with Session(engine) as s:
        run = s.scalar(select(SAE.active_run_id))
        feats = {f.index: f for f in s.scalars(select(Feature).where(Feature.run_id == run))}
        assert len(feats) == n
        for i in range(n):
            f = feats[i]
            assert f.n_fired == int(fired[:, i].sum())
            assert f.density == pytest.approx(fired[:, i].mean())
            assert sum(f.histogram["counts"]) == f.n_fired
            if f.n_fired == 0:
                continue
            assert f.max_act == pytest.approx(float(z[..., i].max()), rel=1e-5)
            assert f.mean_act == pytest.approx(float(z[..., i][z[..., i] > 0].mean()), rel=1e-4)
            assert sum(f.intervals["shares"]) == pytest.approx(1.0, abs=1e-4)
            window_max = np.sort(z[..., i].max(1))[::-1]
            top = s.scalars(select(Example).where(Example.run_id == run, Example.feature_index == i, Example.kind == "top")
                            .order_by(Example.rank)).all()
            expect = window_max[window_max > 0][:8]
            assert [e.max_act for e in top] == pytest.approx([float(v) for v in expect], rel=1e-4)   # one per window, best first
            assert f.top_token_id == unpack_ids(top[0].token_ids)[top[0].max_pos]   # the strongest context's peak token
            for e in top:
                ids, acts = unpack_ids(e.token_ids), unpack_acts(e.acts)
                assert len(ids) == len(acts) == 9 and 0 <= e.max_pos < 9
                assert acts[e.max_pos] == pytest.approx(e.max_act, rel=2e-3)
                assert max(acts) == pytest.approx(e.max_act, rel=2e-3)
                # the provenance points at the real token of the real document
                doc = corpus.doc_ids.index(e.doc_id)
                doc_ids = lm.tokenizer(corpus.read(doc), add_special_tokens=False)["input_ids"]
                if e.doc_offset == -1:   # the EOS separator after the document
                    assert ids[e.max_pos] == lm.tokenizer.eos_token_id
                else:
                    assert doc_ids[e.doc_offset] == ids[e.max_pos]
            samples = s.scalars(select(Example).where(Example.run_id == run, Example.feature_index == i, Example.kind == "interval")).all()
            edges = f.intervals["edges"]
            for e in samples:
                assert edges[e.interval] - 1e-4 <= e.max_act <= edges[e.interval + 1] + 1e-4
            expected_samples = sum(min(3, round(share * f.n_fired)) for share in f.intervals["shares"])
            assert len(samples) == expected_samples
        assert s.scalar(select(func.count()).select_from(TokenFeature).where(TokenFeature.run_id == run)) > 0
        assert all(len(f.neighbours) == 10 and len(f.logits["top"]) == 10 for f in feats.values())
        assert all(f.top_token_id is None for f in feats.values() if f.n_fired == 0)
        for f in feats.values():   # each neighbour carries its own top token, for the page
            assert [t for _, _, t in f.neighbours] == [feats[j].top_token_id for j, _, _ in f.neighbours]
    engine.dispose()


def test_mining_matches_brute_force_sqlite(lm, sae_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    result = mine(sae_dir, small(url), lm=lm, progress=False)
    assert result.positions == WINDOWS * (CONTEXT - 1) and not (sae_dir / "mining").exists()
    check_against_brute_force(url, lm, sae_dir)
    again = mine(sae_dir, small(url), lm=lm, progress=False)   # same settings: nothing to do
    assert again.skipped and again.run_id == result.run_id


def test_mining_matches_brute_force_postgres(lm, sae_dir, pg_url):
    mine(sae_dir, small(pg_url), lm=lm, progress=False)
    check_against_brute_force(pg_url, lm, sae_dir)


def _mine_cmd(sae_dir, url, threads: int):
    return cli_at(threads, "mine", "--sae", str(sae_dir), "--db", url,
            "--tokens", str(CONTEXT * WINDOWS), "--batch-size", "1", "--windows-per-chunk", "2", "--top-n", "8",
            "--n-intervals", "4", "--per-interval", "3", "--histogram-bins", "10", "--context-before", "5",
            "--context-after", "3", "--device", "cpu", "--model-dtype", "float32")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_then_rerun_equals_uninterrupted(backend, lm, sae_dir, tiny_model, tmp_path, request, threads):
    url = f"sqlite:///{tmp_path / 'killed.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    reference = f"sqlite:///{tmp_path / 'reference.db'}"
    env = threads_env(threads)
    done = subprocess.run(_mine_cmd(sae_dir, reference, threads), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(_mine_cmd(sae_dir, url, threads), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = sae_dir / "mining"
    deadline = time.time() + 120
    while len(list(work.glob("shard_*.safetensors"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "mining finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(list(work.glob("shard_*.safetensors")))
    assert 5 <= kept < WINDOWS // 2
    out = subprocess.run(_mine_cmd(sae_dir, url, threads), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert stored(url) == stored(reference)


def test_remining_switches_runs_atomically(lm, sae_dir, tmp_path):
    """A reader polling the visible run during a re-mine always sees one whole run, never an empty or mixed one."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine(sae_dir, small(url), lm=lm, progress=False)
    engine = db.make_engine(url)
    full = stored(url)
    n_examples = len(full["examples"])
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            with engine.connect() as conn:
                run = conn.execute(select(SAE.active_run_id)).scalar()
                count = conn.execute(select(func.count()).select_from(Example).where(Example.run_id == run)).scalar()
                feats = conn.execute(select(func.count()).select_from(Feature).where(Feature.run_id == run)).scalar()
            seen.append((run, count, feats))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        second = mine(sae_dir, small(url, force=True), lm=lm, progress=False)
        polls = len(seen)
        while len(seen) < polls + 2 and thread.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    runs = {r for r, _, _ in seen}
    assert runs == {second.run_id - 1, second.run_id}, runs   # it saw the old run, then the new one
    assert all(count == n_examples and feats == 128 for _, count, feats in seen), set(seen)
    with Session(engine) as s:
        assert s.scalars(select(MiningRun.id)).all() == [second.run_id]    # the old run is gone
    assert stored(url) == full


def test_bad_input(lm, sae_dir, tmp_path, tiny_model):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(SaescopeError, match="n-intervals must be at least 1"):
        StatsConfig(n_intervals=0)
    with pytest.raises(SaescopeError, match="cannot reach the database"):
        mine(sae_dir, small("postgresql://nobody@127.0.0.1:1/none"), lm=lm, progress=False)
    # an SAE reading another width than the model's hook
    wide = load_model(str(tiny_model), device="cpu", dtype="float32")
    wide.model.config.hidden_size = 65
    with pytest.raises(SaescopeError, match="width"):
        mine(sae_dir, small(url), lm=wide, progress=False)
    wide.model.config.hidden_size = 64
    # a corpus shorter than asked finishes with a note
    result = mine(sae_dir, small(url, force=True, tokens=CONTEXT * 100_000), lm=lm, progress=False)
    assert any("corpus ended" in n for n in result.notes)
    # a database behind the code's schema is refused with the command to run
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    with pytest.raises(db.SchemaOutOfDate, match="saescope db upgrade"):
        mine(sae_dir, small(url, force=True), lm=lm, progress=False)


def store_rows(url: str) -> dict:
    """Every stored row of the visible run that mining computes (all columns but ids, run ids and times)."""
    engine = db.make_engine(url)
    with Session(engine) as s:
        run = s.scalar(select(SAE.active_run_id))
        rows = {}
        for table in (Feature, Example, TokenFeature):
            cols = [c for c in table.__table__.columns if c.name not in ("id", "run_id")]
            rows[table.__tablename__] = sorted(tuple(map(repr, r)) for r in s.execute(select(*cols).where(table.run_id == run)))
        config = s.scalar(select(MiningRun.config).where(MiningRun.id == run))
    engine.dispose()
    return {"rows": rows, "config": config}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mining_from_the_cache_equals_mining_from_the_model(dtype, tiny_model, tiny_corpus, tmp_path):
    """The model computes in the cache's dtype: reading the cached windows gives bitwise the model's result."""
    from sae_core.cache import CacheConfig, build_cache
    from sae_core.train import TrainConfig, train

    lm = load_model(str(tiny_model), device="cpu", dtype=dtype)
    cache_cfg = CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.1.hook_resid_post", context_size=CONTEXT,
                            tokens=CONTEXT * 48, batch_size=8, windows_per_shard=16, dtype=dtype, device="cpu", model_dtype=dtype)
    build_cache(cache_cfg, tmp_path / "cache", lm=lm, progress=False)
    train(TrainConfig(n_latents=64, k=4, batch_size=128, tokens=128 * 20, lr=2e-3), tmp_path / "cache", tmp_path / "sae", progress=False)
    tokens = CONTEXT * 64                  # 48 windows in the cache, then 16 from the model
    cached_url, model_url = f"sqlite:///{tmp_path / 'cached.db'}", f"sqlite:///{tmp_path / 'model.db'}"
    first = mine(tmp_path / "sae", small(cached_url, tokens=tokens, model_dtype=dtype), lm=lm, progress=False)
    assert not first.notes
    again = mine(tmp_path / "sae", small(cached_url, tokens=tokens, model_dtype=dtype), lm=lm, progress=False)
    assert again.skipped and again.run_id == first.run_id            # the same cache: the same run
    (tmp_path / "cache").rename(tmp_path / "moved")
    second = mine(tmp_path / "sae", small(model_url, tokens=tokens, model_dtype=dtype), lm=lm, progress=False)
    assert any("is gone: mining runs the model" in n for n in second.notes)
    from_cache, from_model = store_rows(cached_url), store_rows(model_url)
    assert from_cache["config"]["activations"] == {"source": "cache", "dtype": dtype, "windows": 48}
    assert "activations" not in from_model["config"]
    assert all(from_model["rows"][t] for t in from_model["rows"])
    assert from_cache["rows"] == from_model["rows"]
