"""Training on activations streamed from the model: same rows as the cache, and a crashed run
resumed from its checkpoint ends with bitwise the weights of an uninterrupted one."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from sae_core.cache import ActivationCache, CacheConfig, build_cache
from sae_core.errors import SaescopeError
from sae_core.stream import ModelStream
from sae_core.train import TrainConfig, train


def _cfg(tiny_model, tiny_corpus, tokens: int) -> CacheConfig:
    return CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.1.hook_resid_post", context_size=32,
                       tokens=tokens, batch_size=8, windows_per_shard=16, dtype="float32", device="cpu", model_dtype="float32")


def test_stream_yields_the_cache_rows(tiny_lm, tiny_model, tiny_corpus, tmp_path):
    cfg = _cfg(tiny_model, tiny_corpus, 32 * 48)
    build_cache(cfg, tmp_path / "cache", lm=tiny_lm, progress=False)
    cache, stream = ActivationCache(tmp_path / "cache"), ModelStream(cfg, lm=tiny_lm)
    assert stream.n_rows == cache.n_rows and stream.config["hook"] == cache.hook
    cached = torch.cat([cache.load_shard(i) for i in range(len(cache.shards))])
    torch.testing.assert_close(stream._activations(stream._windows(0), 0, 48), cached)          # same windows, same order
    batches = list(stream.batches(64, seed=3))
    assert len(batches) == stream.batches_per_pass(64) > 0
    seen = torch.cat(batches)
    seen_rows, cached_rows = Counter(map(tuple, seen.tolist())), Counter(map(tuple, cached.tolist()))
    assert not seen_rows - cached_rows                  # each row at most as often as in the cache (the corpus repeats)
    assert len(seen) >= cache.n_rows * (1 - 1 / ModelStream.GROUP_BATCHES) - 64
    # skipping k batches yields exactly the rest of the same stream
    rest = list(stream.batches(64, seed=3, skip=len(batches) - 5))
    assert len(rest) == 5 and all(torch.equal(a, b) for a, b in zip(rest, batches[-5:]))


class _Crash(RuntimeError):
    pass


class _CrashingStream(ModelStream):
    """Dies after yielding `after` batches, like a killed process (the checkpoint on disk is what survives)."""

    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.after = after

    def batches(self, *args, **kwargs):
        for i, batch in enumerate(super().batches(*args, **kwargs)):
            if i == self.after:
                raise _Crash
            yield batch


def test_streamed_training_resumes_bitwise(tiny_lm, tiny_model, tiny_corpus, tmp_path, monkeypatch, threads):
    monkeypatch.setattr(ModelStream, "GROUP_BATCHES", 4)          # several groups, so a resume skips whole ones
    cfg = _cfg(tiny_model, tiny_corpus, 32 * 64)
    # bitwise is a CPU claim: with device "auto" a GPU machine trains on CUDA, whose index_add_ sums with atomics
    train_cfg = TrainConfig(n_latents=128, k=6, batch_size=64, lr=2e-3, checkpoint_every=7, device="cpu")
    crashed = tmp_path / "crashed"
    with pytest.raises(_Crash):
        train(train_cfg, _CrashingStream(cfg, lm=tiny_lm, after=17), crashed, progress=False)
    assert torch.load(crashed / "checkpoint.pt", weights_only=False)["step"] == 14
    resumed = train(train_cfg, ModelStream(cfg, lm=tiny_lm), crashed, resume=True, progress=False)
    clean = train(train_cfg, ModelStream(cfg, lm=tiny_lm), tmp_path / "clean", progress=False)
    assert resumed.resumed_from_step == 14 and resumed.steps == clean.steps == ModelStream(cfg, lm=tiny_lm).batches_per_pass(64)
    a, b = load_file(str(crashed / "sae_weights.safetensors")), load_file(str(tmp_path / "clean" / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert clean.log[-1]["fvu"] < clean.log[0]["fvu"]


def test_a_resumed_stream_runs_the_model_on_the_same_window_batches(tiny_lm, tiny_model, tiny_corpus, monkeypatch):
    """The model's rounding may depend on the batch's shape (MKL and oneDNN pick kernels by shape and thread
    count), so a resumed stream must run the model on exactly the batches of windows the uninterrupted one ran
    from its group on, not merely on the same windows."""
    monkeypatch.setattr(ModelStream, "GROUP_BATCHES", 3)
    cfg = _cfg(tiny_model, tiny_corpus, 32 * 64)
    calls: list[bytes] = []
    forward = tiny_lm.residuals
    monkeypatch.setattr(tiny_lm, "residuals", lambda ids, layer: calls.append(ids.numpy().tobytes()) or forward(ids, layer))
    stream = ModelStream(cfg, lm=tiny_lm)
    assert stream._group(64) % cfg.batch_size, "a group must not be whole model batches, or any cut would do"
    uninterrupted = list(stream.batches(64, seed=1))
    all_calls = list(calls)
    for skip in (4, 7, len(uninterrupted) - 1):
        calls.clear()
        rest = list(stream.batches(64, seed=1, skip=skip))
        assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[skip:], strict=True))
        assert 0 < len(calls) < len(all_calls) and calls == all_calls[-len(calls):]


def test_stream_needs_tokens_and_a_long_enough_corpus(tiny_lm, tiny_model, tiny_corpus):
    with pytest.raises(SaescopeError, match="--tokens must be positive"):
        ModelStream(_cfg(tiny_model, tiny_corpus, 0), lm=tiny_lm)
    stream = ModelStream(_cfg(tiny_model, tiny_corpus, 32 * 10**5), lm=tiny_lm)
    with pytest.raises(SaescopeError, match="ended after"):
        for _ in stream.batches(1024):
            pass


def test_cli_trains_from_the_model_without_a_cache(tiny_model, tiny_corpus, tmp_path):
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-c", "from saescope.cli import main; main()", "train", "--out", str(tmp_path / "sae"),
           "--n-latents", "64", "--k", "4", "--batch-size", "64", "--lr", "0.002"]
    missing = subprocess.run(cli, capture_output=True, text=True)
    assert missing.returncode != 0 and "--tokens N to stream" in missing.stdout + missing.stderr
    done = subprocess.run(cli + ["--tokens", "2048", "--model", str(tiny_model), "--corpus", str(tiny_corpus),
                                 "--hook", "blocks.1.hook_resid_post"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["saescope"]["activations"] == "streamed from the model" and meta["saescope"]["cache"]["corpus"] == str(tiny_corpus)
