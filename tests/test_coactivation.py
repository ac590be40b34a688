"""Co-activation counted during mining equals a brute-force count over the mined codes; the partners are
the strongest by Jaccard; mining parts merged store what one process stores; 0 turns it off."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_mine import small

from sae_core import feature_stats
from sae_core.coactivation import CoactivationCounter
from sae_core.mine import mine
from sae_core.store import db
from sae_core.store.schema import SAE, Feature

TOP = 16


def brute_partners(dense: np.ndarray, i: int, top: int) -> list[tuple[int, int, float, float]]:
    """(partner, count, P(partner | i), Jaccard) of feature i from a dense [n, n] count, strongest first."""
    fired = np.diag(dense)
    rows = [
        (j, int(dense[i, j]), dense[i, j] / fired[i], dense[i, j] / (fired[i] + fired[j] - dense[i, j]))
        for j in range(len(dense))
        if j != i and dense[i, j] > 0
    ]
    rows.sort(key=lambda r: (-r[3], -r[1], r[0]))
    return rows[:top]


@pytest.mark.parametrize("batch_entries", [1 << 24, 60])  # one product at the end; a product every chunk or two
def test_counter_equals_dense_count_across_chunks(batch_entries):
    rng = np.random.default_rng(0)
    n, k = 50, 5
    counter, dense = CoactivationCounter(n, batch_entries), np.zeros((n, n), np.int64)
    for rows in (40, 1, 73):  # chunks of different lengths, one of a single position
        idx = np.stack([rng.choice(n, k, replace=False) for _ in range(rows)])
        active = rng.random((rows, k)) < 0.7  # some code slots inactive (value 0)
        indicator = np.zeros((rows, n), np.int64)
        np.put_along_axis(indicator, idx, active.astype(np.int64), axis=1)
        dense += indicator.T @ indicator
        r = np.repeat(np.arange(rows), k).reshape(rows, k)
        counter.add(r[active], idx[active])
    assert (counter.counts().toarray() == dense).all()
    got = counter.top_partners(TOP)
    for i in range(n):
        want = brute_partners(dense, i, TOP)
        assert [(p, c) for p, c, _, _ in got.rows(i)] == [(p, c) for p, c, _, _ in want]
        assert np.allclose([r[2:] for r in got.rows(i)], [r[2:] for r in want], atol=1e-6) if want else got.rows(i) == []


def _stored(url: str) -> dict[int, list | None]:
    engine = db.make_engine(url)
    with Session(engine) as s:
        run = s.scalar(select(SAE.active_run_id))
        rows = s.execute(select(Feature.index, Feature.coactivation, Feature.n_fired).where(Feature.run_id == run)).all()
    engine.dispose()
    return {i: (c if c is None or isinstance(c, list) else json.loads(c), fired) for i, c, fired in rows}


def test_mined_coactivation_equals_brute_force_count(tiny_sae_dir, tiny_lm, tmp_path, monkeypatch):
    """The run's stored partners against a dense count of every mined position's code (the chunks kept)."""
    kept = tmp_path / "chunks"
    monkeypatch.setattr("sae_core.mine.shutil.rmtree", lambda path, **kw: shutil.copytree(path, kept))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine(tiny_sae_dir, small(url), lm=tiny_lm, progress=False)
    chunks = feature_stats.CodeChunks(sorted(kept.glob("shard_*.safetensors")), 1)
    n = 128
    dense = np.zeros((n, n), np.int64)
    for c in range(len(chunks)):
        code = chunks.load(c)
        indicator = torch.zeros(len(code["vals"]), n, dtype=torch.int64)
        indicator.scatter_(1, code["idx"].long(), (code["vals"] > 0).long())
        dense += (indicator.T @ indicator).numpy()
    stored = _stored(url)
    assert sum(len(c or []) for c, _ in stored.values()) > n  # the run has co-firing partners to check
    for i, (coact, fired) in stored.items():
        assert fired == dense[i, i]
        want = brute_partners(dense, i, TOP)
        assert [(p, count) for p, count, *_ in coact] == [(p, count) for p, count, *_ in want]
        for (_, _, p_given, jac, _), (_, _, want_p, want_j) in zip(coact, want):
            assert p_given == pytest.approx(want_p, abs=1e-4) and jac == pytest.approx(want_j, abs=1e-4)


def test_merged_parts_store_the_same_coactivation(tiny_sae_dir, tiny_lm, tmp_path):
    one = f"sqlite:///{tmp_path / 'one.db'}"
    mine(tiny_sae_dir, small(one), lm=tiny_lm, progress=False)
    parts = f"sqlite:///{tmp_path / 'parts.db'}"
    for i in range(2):
        mine(tiny_sae_dir, small(parts, shard=f"{i}/2"), lm=tiny_lm, progress=False)
    mine(tiny_sae_dir, small(parts, merge_shards=2), lm=tiny_lm, progress=False)
    assert _stored(parts) == _stored(one)


def test_zero_partners_store_none_and_is_another_run(tiny_sae_dir, tiny_lm, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine(tiny_sae_dir, small(url), lm=tiny_lm, progress=False)
    result = mine(tiny_sae_dir, small(url, coactivation=0), lm=tiny_lm, progress=False)
    assert not result.skipped  # the setting is part of the run's identity
    assert all(c is None for c, _ in _stored(url).values())


def test_dense_and_sparse_counts_agree_on_unsorted_rows():
    """The dense upper-triangle count (narrow SAEs) and the sparse product (wide ones, dense_bytes=0) give
    the same counts and partners, with a chunk whose positions come out of order."""
    rng = np.random.default_rng(1)
    n, k = 64, 6
    dense_counter, sparse_counter = CoactivationCounter(n), CoactivationCounter(n, dense_bytes=0)
    assert dense_counter.upper is not None and sparse_counter.upper is None
    for rows in (30, 55):
        r = np.repeat(np.arange(rows), k)
        f = np.concatenate([rng.choice(n, k, replace=False) for _ in range(rows)])
        order = rng.permutation(len(r)) if rows == 55 else np.arange(len(r))
        for counter in (dense_counter, sparse_counter):
            counter.add(r[order], f[order])
    assert (dense_counter.counts() != sparse_counter.counts()).nnz == 0
    a, b = dense_counter.top_partners(TOP), sparse_counter.top_partners(TOP)
    for field in ("partners", "counts", "p_given", "jaccard"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
