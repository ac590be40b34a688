"""The corpus -> windows -> activation cache stage, on a tiny random Llama built in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sae_core.cache import ActivationCache, CacheConfig, build_cache, reusable_cache
from sae_core.windows import WindowSource
from sae_core.corpus import iter_windows, open_corpus
from sae_core.errors import SaescopeError
from sae_core.model import load_model, parse_hook


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), device="cpu", dtype="float32")


def cfg_for(tiny_model, tiny_corpus, **kw) -> CacheConfig:
    base = dict(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.1.hook_resid_post",
                context_size=32, tokens=32 * 40, batch_size=4, windows_per_shard=8, dtype="float32",
                device="cpu", model_dtype="float32")
    base.update(kw)
    return CacheConfig(**base)


def test_windows_trace_back_to_their_documents(lm, tiny_corpus):
    corpus = open_corpus(str(tiny_corpus))
    windows = list(iter_windows(corpus, lm.tokenizer, context_size=32))
    assert len(windows) > 50
    encoded = {}
    for w in windows[:30]:
        for tok, doc, off in zip(w.tokens[0], w.doc_index[0], w.doc_offset[0]):
            if off < 0:
                assert tok == lm.eos_token_id
                continue
            ids = encoded.setdefault(doc, lm.tokenizer(corpus.read(doc), add_special_tokens=False).input_ids)
            assert ids[off] == tok
    # resuming skips exactly the windows already produced
    resumed = list(iter_windows(corpus, lm.tokenizer, context_size=32, skip_windows=7))
    assert np.array_equal(resumed[0].tokens, windows[7].tokens) and len(resumed) == len(windows) - 7


def test_cache_holds_the_residuals_of_each_window(lm, tiny_model, tiny_corpus, tmp_path):
    cfg = cfg_for(tiny_model, tiny_corpus)
    result = build_cache(cfg, tmp_path / "c", lm=lm, progress=False)
    assert result.n_windows == 40 and result.n_rows == 40 * 31 and result.complete
    cache = ActivationCache(tmp_path / "c")
    assert cache.d_model == 64 and len(cache.shards) == 5 and cache.n_rows == 40 * 31
    tokens = cache.load_shard(2, "tokens")
    acts = cache.load_shard(2)
    expect = lm.residuals(tokens.long(), parse_hook(cfg.hook))[:, 1:].reshape(-1, 64)
    torch.testing.assert_close(acts, expect.float())
    rows = torch.cat(list(cache.batches(50, seed=1, buffer_shards=2, drop_last=False)))
    assert rows.shape == (40 * 31, 64)
    everything = torch.cat([cache.load_shard(i) for i in range(5)])
    torch.testing.assert_close(rows.double().sum(0), everything.double().sum(0))
    assert not torch.equal(rows, everything), "batches must be shuffled"
    # the same command again is a no-op; a longer one extends the cache
    again = build_cache(cfg, tmp_path / "c", lm=lm, progress=False)
    assert "nothing to do" in again.notes[0]
    longer = build_cache(cfg_for(tiny_model, tiny_corpus, tokens=32 * 60), tmp_path / "c", lm=lm, progress=False)
    assert longer.n_windows == 60 and longer.resumed_from == 40


def test_window_source_reads_the_cache_then_runs_the_model(lm, tiny_model, tiny_corpus, tmp_path):
    cfg = cfg_for(tiny_model, tiny_corpus, tokens=32 * 20)           # shards of 8, 8 and 4 windows
    build_cache(cfg, tmp_path / "c", lm=lm, progress=False)
    cache, why = reusable_cache(tmp_path / "c", cfg)
    assert why is None and cache.whole_windows == 20
    corpus = open_corpus(str(tiny_corpus))
    source = WindowSource(lm, corpus, cfg, 2, from_cache=cache)
    batches = [source.take(n) for n in (5, 7, 9, 6)]                  # across shards, then past the cache's end
    assert [len(b) for b in batches] == [5, 7, 9, 6]
    want = list(iter_windows(corpus, lm.tokenizer, 32))[2:29]
    for name in ("tokens", "doc_index", "doc_offset"):
        assert np.array_equal(np.concatenate([getattr(b, name) for b in batches]), np.concatenate([getattr(w, name) for w in want]))
    acts = torch.cat([b.acts for b in batches])
    stored = torch.cat([cache.load_shard(i) for i in range(3)]).view(20, 31, 64)
    assert torch.equal(acts[:18], stored[2:])                          # windows 2..19 read, not recomputed
    tokens = torch.from_numpy(np.concatenate([w.tokens for w in want])).long()
    torch.testing.assert_close(acts, lm.residuals(tokens, 1)[:, 1:])
    # a cache of other windows, or none, is not used; a cache still being written offers its whole shards
    assert reusable_cache(tmp_path / "c", cfg_for(tiny_model, tiny_corpus, hook="blocks.2.hook_resid_post"))[1].endswith("another hook")
    assert "is gone" in reusable_cache(tmp_path / "none", cfg)[1]
    (tmp_path / "c" / "shard_00001.safetensors").unlink()
    assert reusable_cache(tmp_path / "c", cfg)[0].whole_windows == 8


def test_bad_input_is_refused_without_touching_existing_output(lm, tiny_model, tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "c"
    build_cache(cfg_for(tiny_model, tiny_corpus, tokens=32 * 8), out, lm=lm, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SaescopeError, match="another configuration: hook"):
        build_cache(cfg_for(tiny_model, tiny_corpus, hook="blocks.2.hook_resid_post"), out, lm=lm, progress=False)
    with pytest.raises(SaescopeError, match="another configuration: model"):
        build_cache(cfg_for(tiny_model, tiny_corpus, model="other"), out, lm=lm, progress=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SaescopeError, match="past the model's depth"):
        build_cache(cfg_for(tiny_model, tiny_corpus, hook="blocks.4.hook_resid_post"), tmp_path / "d", lm=lm, progress=False)
    assert not (tmp_path / "d").exists()
    with pytest.raises(SaescopeError, match="not of the form"):
        parse_hook("layer8")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(SaescopeError, match="fewer than 32 tokens"):
        build_cache(cfg_for(tiny_model, empty), tmp_path / "e", lm=lm, progress=False)
    (tmp_path / "no-text").mkdir()
    with pytest.raises(SaescopeError, match="no .txt files"):
        build_cache(cfg_for(tiny_model, tmp_path / "no-text"), tmp_path / "f", lm=lm, progress=False)
    with pytest.raises(SaescopeError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(SaescopeError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(SaescopeError, match="not enough disk space"):
        build_cache(cfg_for(tiny_model, tiny_corpus), tmp_path / "g", lm=lm, progress=False)


def test_short_corpus_ends_with_a_note(lm, tiny_model, tiny_corpus, tmp_path):
    result = build_cache(cfg_for(tiny_model, tiny_corpus, tokens=10**7), tmp_path / "c", lm=lm, progress=False)
    assert result.complete and "corpus ended after" in result.notes[0]
    assert ActivationCache(tmp_path / "c").n_rows == result.n_rows


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from saescope.cli import main; main()", *args]


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path, tiny_corpus, threads):
    from conftest import cli_at, make_tiny_model, threads_env

    # a wider model so the run lasts long enough to be killed mid-way
    model = make_tiny_model(tmp_path / "m", tiny_corpus, hidden=256, layers=4)
    args = ["--model", str(model), "--corpus", str(tiny_corpus), "--hook", "blocks.3.hook_resid_post",
            "--context-size", "64", "--tokens", str(64 * 192), "--batch-size", "4", "--windows-per-shard", "8",
            "--dtype", "float32", "--model-dtype", "float32", "--device", "cpu"]
    env = threads_env(threads)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_at(threads, "cache", "--out", str(killed), *args), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard_*.safetensors"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / "cache.json").read_text())
    assert not manifest["complete"], "the run finished before it could be killed; make it longer"
    n_before = len(list(killed.glob("shard_*.safetensors")))
    assert 3 <= n_before < 24
    subprocess.run(cli_at(threads, "cache", "--out", str(killed), *args), env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cli_at(threads, "cache", "--out", str(clean), *args), env=env, check=True, capture_output=True)
    a, b = ActivationCache(killed), ActivationCache(clean)
    assert a.complete and b.complete and len(a.shards) == len(b.shards) == 24
    assert not list(killed.glob("*.tmp"))
    for i in range(24):
        for name in ("tokens", "doc_index", "doc_offset", "activations"):
            assert torch.equal(a.load_shard(i, name), b.load_shard(i, name)), (i, name)


def test_cli_prints_one_line_errors(tmp_path):
    proc = subprocess.run(_cli("cache", "--out", str(tmp_path / "x"), "--hook", "resid8"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: hook 'resid8' is not of the form")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
