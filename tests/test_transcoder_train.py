"""Transcoders for several layers trained in one pass (sae_core/train_transcoders.py) on the tiny Llama: the MLP hooks,
the training, resuming after kill -9, mining a transcoder through the interface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sae_core.config import CacheConfig, TrainConfig
from sae_core.errors import SaescopeError
from sae_core.interchange import load_sae
from sae_core.sae import SkipTranscoderSAE
from sae_core.train_transcoders import TRANSCODER_LATENTS, MLPStream, parse_layers, train_transcoders, transcoder_config


def stream_cfg(tiny_model, tiny_corpus, tokens=32 * 48) -> CacheConfig:
    return CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.0.hook_resid_post", context_size=32, tokens=tokens)


def small_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"n_latents": 64, "k": 4, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 3, "device": "cpu", **kw})


def test_mlp_hooks_are_the_mlps_input_and_output(tiny_lm):
    ids = torch.randint(0, 100, (2, 12))
    acts = tiny_lm.mlp_activations(ids, [0, 2])
    assert set(acts) == {0, 2}
    layer = tiny_lm.layers[2]
    with torch.inference_mode():
        x, y = acts[2]
        # the MLP's input is the normalised residual its layer feeds it; its output is the MLP of that
        torch.testing.assert_close(layer.mlp(x), y)
        resid_mid = None

        def grab(_m, args, _out):
            nonlocal resid_mid
            resid_mid = args[0]

        h = layer.post_attention_layernorm.register_forward_hook(grab)
        tiny_lm.model(input_ids=ids, use_cache=False)
        h.remove()
        torch.testing.assert_close(layer.post_attention_layernorm(resid_mid), x)
    torch.testing.assert_close(tiny_lm.activations(ids, "blocks.2.hook_mlp_out"), y)
    torch.testing.assert_close(tiny_lm.activations(ids, "blocks.1.hook_resid_post"), tiny_lm.residuals(ids, 1))


def test_replace_mlps_swaps_every_mlp_at_once(tiny_lm):
    ids = torch.randint(0, 100, (1, 10))
    with torch.inference_mode():
        plain = tiny_lm.model(input_ids=ids, use_cache=False).logits
        seen = []
        with tiny_lm.replace_mlps(
            {layer: (lambda x, layer=layer: seen.append(layer) or tiny_lm.mlp(layer).forward(x)) for layer in range(4)}
        ):
            same = tiny_lm.model(input_ids=ids, use_cache=False).logits
        with tiny_lm.replace_mlps({1: torch.zeros_like}):
            changed = tiny_lm.model(input_ids=ids, use_cache=False).logits
    assert sorted(seen) == [0, 1, 2, 3]
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(changed, plain)


def test_parse_layers_and_defaults():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("3,0-1,1", 4) == [0, 1, 3]
    for bad in ("4", "x", ","):
        with pytest.raises(SaescopeError):
            parse_layers(bad, 4)
    cfg = transcoder_config(TrainConfig())
    assert cfg.architecture == SkipTranscoderSAE.architecture and cfg.n_latents == TRANSCODER_LATENTS
    with pytest.raises(SaescopeError, match="not a transcoder"):
        transcoder_config(TrainConfig(architecture="relu"))


def test_trains_every_layer_in_one_pass_and_saves_loadable_transcoders(tiny_lm, tiny_model, tiny_corpus, tmp_path):
    calls = []
    real = tiny_lm.mlp_activations

    def counting(ids, layers):
        calls.append(list(layers))
        return real(ids, layers)

    tiny_lm.mlp_activations = counting
    try:
        result = train_transcoders(small_cfg(), stream_cfg(tiny_model, tiny_corpus), "all", tmp_path / "tc", progress=False, lm=tiny_lm)
    finally:
        del tiny_lm.mlp_activations
    # shuffle groups of two batches drop their leftover rows (as ModelStream's): 10 batches of 48 windows' 1488 rows
    assert result.layers == [0, 1, 2, 3] and result.steps == 10 and result.tokens == 1280
    # every forward captures all four layers: the sample's 2 (48 windows, 32 at a time), one per shuffle group with whole batches
    assert calls == [[0, 1, 2, 3]] * (2 + 5)
    # on corpus windows (the tiny model's MLPs see other inputs on random tokens), each raw MLP output is
    # predicted from its raw MLP input better than by the mean: the scales are folded in right
    rows = MLPStream(stream_cfg(tiny_model, tiny_corpus), [0, 1, 2, 3], tiny_lm).shared_sample()
    d = tiny_lm.d_model
    for layer, folder in result.folders.items():
        loaded = load_sae(folder)
        assert isinstance(loaded.sae, SkipTranscoderSAE) and loaded.sae.cfg.layer == layer
        assert loaded.provenance.hook == f"blocks.{layer}.hook_mlp_in"
        x, y = rows[:, 2 * d * layer : 2 * d * layer + d], rows[:, 2 * d * layer + d : 2 * d * (layer + 1)]
        with torch.no_grad():
            pred = loaded.sae.transcode(x)
        fvu = float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu < 0.97, (layer, fvu)
    log = [json.loads(line) for line in (tmp_path / "tc" / "train_log.jsonl").read_text().splitlines()]
    assert log and set(log[-1]) >= {"layer_0", "layer_3"}


def test_refuses_a_full_folder_and_another_configuration_on_resume(tiny_lm, tiny_model, tiny_corpus, tmp_path):
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "x").write_text("")
    with pytest.raises(SaescopeError, match="not empty"):
        train_transcoders(small_cfg(), stream_cfg(tiny_model, tiny_corpus), "0", tmp_path / "tc", progress=False, lm=tiny_lm)
    train_transcoders(small_cfg(), stream_cfg(tiny_model, tiny_corpus, tokens=32 * 8), "0,1", tmp_path / "b", progress=False, lm=tiny_lm)
    with pytest.raises(SaescopeError, match="layers"):
        train_transcoders(
            small_cfg(), stream_cfg(tiny_model, tiny_corpus, tokens=32 * 8), "0", tmp_path / "b", resume=True, progress=False, lm=tiny_lm
        )


RUN = """
import sys, time
from pathlib import Path
import sae_core.train as train_mod
from sae_core.config import CacheConfig, TrainConfig
from sae_core.train_transcoders import train_transcoders
model, corpus, out, slow = sys.argv[1:5]
if slow == "1":  # give the parent time to kill the run between checkpoints
    real = train_mod.Trainer.step
    def step(self, *a, **k):
        time.sleep(0.05)
        return real(self, *a, **k)
    train_mod.Trainer.step = step
cfg = TrainConfig(n_latents=64, k=4, batch_size=128, lr=3e-3, checkpoint_every=3, device="cpu")
s = CacheConfig(model=model, corpus=corpus, hook="blocks.0.hook_resid_post", context_size=32, tokens=32 * 48, device="cpu")
train_transcoders(cfg, s, "0,2", Path(out), resume=True, progress=False)
"""


def test_kill_9_and_resume_ends_with_the_uninterrupted_weights(tiny_model, tiny_corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", RUN, str(tiny_model), str(tiny_corpus)]
    subprocess.run([*args, str(tmp_path / "whole"), "0"], check=True, env=env, timeout=600)
    proc = subprocess.Popen([*args, str(tmp_path / "cut"), "1"], env=env)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # past the first checkpoint, before the end
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 11
    subprocess.run([*args, str(tmp_path / "cut"), "0"], check=True, env=env, timeout=600)
    for layer in (0, 2):
        a = load_sae(tmp_path / "whole" / f"layer_{layer}").sae.state_dict()
        b = load_sae(tmp_path / "cut" / f"layer_{layer}").sae.state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), (layer, name)


def test_cli_trains_and_evaluates_transcoders(tiny_model, tiny_corpus, tmp_path):
    """`saescope train --transcoders 1,3` then `saescope eval-transcoders`: each layer's FVU, and the CE loss with both
    MLPs replaced at once between the clean one and the one with those MLPs zeroed."""
    from typer.testing import CliRunner

    from saescope.cli import app

    runner = CliRunner()
    args = ["--model", str(tiny_model), "--corpus", str(tiny_corpus), "--tokens", str(32 * 160), "--device", "cpu"]
    train = ["train", "--transcoders", "1,3", "--out", str(tmp_path / "tc"), "--n-latents", "128", "--k", "8", "--batch-size", "128",
             "--lr", "5e-3", *args]  # fmt: skip
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    assert "trained 2 transcoders" in result.output
    result = runner.invoke(app, ["eval-transcoders", "--out", str(tmp_path / "tc"), "--tokens", "1024", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "tc" / "eval_transcoders.json").read_text())
    assert set(report["fvu"]) == {"1", "3"} and all(0 < v < 1 for v in report["fvu"].values()), report
    # the tiny random model's MLPs barely move its CE (about log(vocab) whatever they do): compare the KLs
    assert 0 < report["kl"] < report["kl_zeroed"]
    assert report["ce_clean"] != report["ce_replaced"] and report["tokens"] == 32 * 31 + 24
    failed = runner.invoke(app, ["train", "--transcoders", "1", "--out", str(tmp_path / "x"), "--model", str(tiny_model)])
    assert isinstance(failed.exception, SaescopeError) and "--tokens" in str(failed.exception)


def test_a_transcoder_is_mined_on_its_mlp_input_through_the_interface(tiny_lm, tiny_model, tiny_corpus, tmp_path):
    """`saescope mine --sae <layer folder>`: the miner captures blocks.L.hook_mlp_in (windows.py) and encodes it with
    the transcoder's own encoder (no input centring: encoder_affine), knowing nothing of the architecture."""
    from conftest import mine_tiny
    from sqlalchemy import text

    from sae_core.mine import CodeEncoder
    from sae_core.store import db

    result = train_transcoders(small_cfg(), stream_cfg(tiny_model, tiny_corpus), "1,2", tmp_path / "tc", progress=False, lm=tiny_lm)
    tc = load_sae(result.folders[2]).sae
    ids = torch.randint(0, 250, (2, 32))
    x = tiny_lm.activations(ids, "blocks.2.hook_mlp_in")
    codes = CodeEncoder(tc, tc.code_width(64), torch.float32, {})(x)
    with torch.inference_mode():
        vals, idx = tc.encode_sparse(x.reshape(-1, x.shape[-1]))
    torch.testing.assert_close(codes["vals"], vals)
    assert torch.equal(codes["idx"].long().sort(-1).values, idx.sort(-1).values)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mined = mine_tiny(result.folders[2], tiny_lm, url, windows=32)
    assert mined.alive > 0 and mined.positions == 32 * 31
    with db.open_store(url).connect() as conn:
        hooks = [row[0] for row in conn.execute(text("SELECT hook FROM saes"))]
    assert hooks == ["blocks.2.hook_mlp_in"]
