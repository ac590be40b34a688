"""Sharded mining: parts mined separately (`--shard i/N`, or torchrun ranks with Gloo) and merged store
exactly what one process stores over the same windows: the same features and examples, top contexts
identical, statistics equal (the merge runs the same sweep over the same chunks, so equal to the bit).
A part resumes after its whole chunks like a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_mine import CONTEXT, WINDOWS, small, stored

from sae_core.errors import SaescopeError
from sae_core.mine import mine
from sae_core.store import db
from sae_core.store.schema import SAE, Feature


@pytest.fixture(scope="module")
def reference(tiny_sae_dir, tiny_lm, tmp_path_factory):
    """The single-process run: its stored features and examples, and the moments stored per feature."""
    url = f"sqlite:///{tmp_path_factory.mktemp('ref') / 'store.db'}"
    mine(tiny_sae_dir, small(url), lm=tiny_lm, progress=False)
    return stored(url), moments(url)


def moments(url: str) -> dict:
    engine = db.make_engine(url)
    with Session(engine) as s:
        run = s.scalar(select(SAE.active_run_id))
        out = {f.index: (f.density, f.mean_act, f.max_act) for f in s.scalars(select(Feature).where(Feature.run_id == run))}
    engine.dispose()
    return out


def check_same_as_reference(url: str, reference) -> None:
    want, want_moments = reference
    got = stored(url)
    assert got["features"] == want["features"]
    assert got["examples"] == want["examples"]  # top contexts and interval samples: same contexts, ranks, activations
    assert len(want["examples"]) > 0 and any(f[0] > 0 for f in want["features"].values())
    for i, (density, mean_act, max_act) in moments(url).items():
        assert (density, max_act) == want_moments[i][::2]
        assert mean_act == pytest.approx(want_moments[i][1], rel=1e-6)


@pytest.mark.parametrize("parts", [2, 4])  # 6 chunks: 3 + 3, and 1 + 2 + 1 + 2
def test_parts_merged_store_what_one_process_stores(tiny_sae_dir, tiny_lm, tmp_path, reference, parts):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for i in range(parts):
        result = mine(tiny_sae_dir, small(url, shard=f"{i}/{parts}"), lm=tiny_lm, progress=False)
        assert not result.published and f"--merge-shards {parts}" in result.notes[-1]
    assert sum(len(list(p.glob("shard_*"))) for p in (tiny_sae_dir / "mining").iterdir()) == WINDOWS // 16
    result = mine(tiny_sae_dir, small(url, merge_shards=parts), lm=tiny_lm, progress=False)
    assert result.published and result.positions == WINDOWS * (CONTEXT - 1)
    assert not (tiny_sae_dir / "mining").exists()
    check_same_as_reference(url, reference)


def test_a_part_resumes_and_the_merge_names_what_is_missing(tiny_sae_dir, tiny_lm, tmp_path, reference):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine(tiny_sae_dir, small(url, shard="0/2"), lm=tiny_lm, progress=False)
    with pytest.raises(SaescopeError, match=r"part 1/2 is not mined"):
        mine(tiny_sae_dir, small(url, merge_shards=2), lm=tiny_lm, progress=False)
    mine(tiny_sae_dir, small(url, shard="1/2"), lm=tiny_lm, progress=False)
    # as a kill leaves it: the last chunk of part 1 gone, its manifest not complete
    folder = tiny_sae_dir / "mining" / "part-001-of-002"
    sorted(folder.glob("shard_*.safetensors"))[-1].unlink()
    manifest = json.loads((folder / "cache.json").read_text())
    (folder / "cache.json").write_text(json.dumps({**manifest, "complete": False, "n_windows": manifest["n_windows"] - 16}))
    with pytest.raises(SaescopeError, match=r"part 1/2 is not mined"):
        mine(tiny_sae_dir, small(url, merge_shards=2), lm=tiny_lm, progress=False)
    mine(tiny_sae_dir, small(url, shard="1/2"), lm=tiny_lm, progress=False)  # mines the missing chunk only
    with pytest.raises(SaescopeError, match="another split"):  # parts of other --tokens do not merge
        mine(tiny_sae_dir, small(url, merge_shards=2, tokens=CONTEXT * (WINDOWS - 16)), lm=tiny_lm, progress=False)
    mine(tiny_sae_dir, small(url, merge_shards=2), lm=tiny_lm, progress=False)
    check_same_as_reference(url, reference)
    with pytest.raises(SaescopeError, match="I/N"):
        mine(tiny_sae_dir, small(url, shard="2/2"), lm=tiny_lm, progress=False)


def test_torchrun_ranks_mine_parts_and_rank_0_publishes(tiny_sae_dir, tmp_path, reference):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
        str(Path(sys.executable).with_name("saescope")),
        "mine",
        "--sae",
        str(tiny_sae_dir),
        "--db",
        url,
        "--tokens",
        str(CONTEXT * WINDOWS),
        "--batch-size",
        "8",
        "--windows-per-chunk",
        "16",
        "--top-n",
        "8",
        "--n-intervals",
        "4",
        "--per-interval",
        "3",
        "--histogram-bins",
        "10",
        "--context-before",
        "5",
        "--context-after",
        "3",
        "--device",
        "cpu",
        "--model-dtype",
        "float32",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is live" in done.stderr
    check_same_as_reference(url, reference)
