"""Training on a cache, resume after kill -9, bad input, and evaluation with the model spliced."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICES, cli_at, threads_env
from sae_core.cache import CacheConfig, build_cache
from sae_core.errors import SaescopeError
from sae_core.evaluate import EvalConfig, evaluate
from sae_core.hardware import keep_large_buffers
from sae_core.interchange import load_sae
from sae_core.model import load_model
from sae_core.train import TrainConfig, train


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def cache_dir(lm, tiny_model, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.1.hook_resid_post", context_size=32,
                      tokens=32 * 64, batch_size=8, windows_per_shard=16, dtype="float32", device="cpu", model_dtype="float32")
    build_cache(cfg, out, lm=lm, progress=False)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_training_learns_and_saves_a_usable_sae(cache_dir, tmp_path, device):
    cfg = TrainConfig(n_latents=256, k=8, batch_size=128, tokens=128 * 150, lr=2e-3, checkpoint_every=50, device=device)
    result = train(cfg, cache_dir, tmp_path / "sae", progress=False)
    assert result.steps == 150
    first, last = result.log[0], result.log[-1]
    assert last["fvu"] < 0.5 * first["fvu"], (first, last)
    assert last["l0"] <= 8
    sae, cfg_json = load_sae(tmp_path / "sae")
    assert cfg_json["k"] == 8 and cfg_json["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))


def test_auxk_revives_dead_latents(cache_dir, tmp_path):
    """With a short dead threshold, AuxK must keep the dead fraction below a run without it."""
    common = dict(n_latents=512, k=4, batch_size=128, tokens=128 * 200, lr=2e-3, dead_tokens=128 * 10, checkpoint_every=1000)
    with_aux = train(TrainConfig(**common), cache_dir, tmp_path / "a", progress=False).final["dead_fraction"]
    without = train(TrainConfig(**common, aux_coef=0.0, tied_init=False), cache_dir, tmp_path / "b", progress=False).final["dead_fraction"]
    assert with_aux < without


def test_relu_baseline_trains(cache_dir, tmp_path):
    result = train(TrainConfig(architecture="relu", n_latents=256, batch_size=128, tokens=128 * 60, lr=2e-3, l1_coef=1e-3),
                   cache_dir, tmp_path / "relu", progress=False)
    assert result.log[-1]["fvu"] < result.log[0]["fvu"]
    assert load_sae(tmp_path / "relu")[1]["architecture"] == "standard"


def test_bad_input_stops_cleanly(cache_dir, tmp_path):
    with pytest.raises(SaescopeError, match="k .* must be smaller than n_latents"):
        train(TrainConfig(n_latents=64, k=64, batch_size=128), cache_dir, tmp_path / "a", progress=False)
    cfg = TrainConfig(n_latents=128, k=4, batch_size=128, tokens=128 * 12, checkpoint_every=4)
    train(cfg, cache_dir, tmp_path / "b", progress=False)
    with pytest.raises(SaescopeError, match="not empty; pass --resume"):
        train(cfg, cache_dir, tmp_path / "b", progress=False)
    with pytest.raises(SaescopeError, match="another configuration .*n_latents"):
        train(TrainConfig(n_latents=256, k=4, batch_size=128, tokens=128 * 12), cache_dir, tmp_path / "b", resume=True, progress=False)
    # a NaN in the cache: training stops, names the batch, and keeps the last good checkpoint
    bad = tmp_path / "bad-cache"
    subprocess.run(["cp", "-r", str(cache_dir), str(bad)], check=True)
    from safetensors.torch import save_file
    from safetensors import safe_open
    shard = sorted(bad.glob("shard_*.safetensors"))[1]
    with safe_open(str(shard), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["activations"][5, 3] = float("nan")
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(SaescopeError, match=r"batch \d+ of epoch 0 .* NaN or Inf.*last good checkpoint"):
        train(TrainConfig(n_latents=128, k=4, batch_size=64, checkpoint_every=2), bad, tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "sae_weights.safetensors").exists(), "a failed run must not save final weights"


def test_resume_after_kill_9_gives_bitwise_the_same_weights(cache_dir, tmp_path, threads):
    args = ["--activations", str(cache_dir), "--n-latents", "2048", "--k", "8", "--batch-size", "128",
            "--tokens", str(128 * 600), "--checkpoint-every", "25", "--lr", "1e-3", "--device", "cpu"]   # bitwise: a CPU claim
    cli, env = cli_at(threads, "train"), threads_env(threads)   # bitwise at the same thread count, whatever it is
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli + ["--out", str(killed)] + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 50:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "sae_weights.safetensors").exists(), "the run finished before it could be killed"
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 50 <= step_at_kill < 600
    subprocess.run(cli + ["--out", str(killed), "--resume"] + args, env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cli + ["--out", str(clean)] + args, env=env, check=True, capture_output=True)
    a, b = load_file(str(killed / "sae_weights.safetensors")), load_file(str(clean / "sae_weights.safetensors"))
    for name in b:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(ln)["step"] for ln in (killed / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "the resumed log must not repeat steps"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL_CBWR is MKL's; this torch has no MKL")
@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_training_gives_the_same_weights_at_any_thread_count_under_mkl_strict_cnr(cache_dir, tmp_path, architecture):
    """What docs/deployment.md promises across thread counts: with MKL_CBWR=AUTO,STRICT (MKL's GEMMs then
    sum in one order whatever the thread count) a run ends with the same weights at 1, 2 and 8 threads, so
    one resumed under another thread count ends where an uninterrupted one would. Sized so that the
    threads split the work: a batch's 1,024 x 64 values are twice PyTorch's grain (32,768), so a plain
    .sum() adds two threads' partial sums (sae/reductions.py avoids it), and without MKL_CBWR MKL splits
    AuxK's product over the dead latents at 2 threads. Either alone makes this test fail."""
    args = ["train", "--activations", str(cache_dir), "--architecture", architecture, "--n-latents", "2048", "--k", "8",
            "--batch-size", "1024", "--tokens", str(1024 * 5), "--lr", "1e-3", "--device", "cpu"]
    weights = []
    for n in (1, 2, 8):
        out = tmp_path / str(n)
        done = subprocess.run(cli_at(n, *args, "--out", str(out)), env={**threads_env(n), "MKL_CBWR": "AUTO,STRICT"},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        weights.append(load_file(str(out / "sae_weights.safetensors")))
    for name in weights[0]:
        assert all(torch.equal(w[name], weights[0][name]) for w in weights[1:]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_a_gpu_checkpoint_resumes_on_a_machine_without_one(cache_dir, tmp_path):
    """A run checkpointed on CUDA continues with --device cpu in a process that sees no GPU."""
    args = ["--activations", str(cache_dir), "--n-latents", "256", "--k", "8", "--batch-size", "128",
            "--tokens", str(128 * 40), "--checkpoint-every", "20"]
    cli = [sys.executable, "-c", "from saescope.cli import main; main()", "train", "--out", str(tmp_path / "sae")]
    subprocess.run(cli + args + ["--device", "cuda"], check=True, capture_output=True)
    saved = tmp_path / "sae" / "sae_weights.safetensors"
    on_gpu = load_file(str(saved))
    saved.unlink()                                  # as if the run had stopped right after its last checkpoint
    ckpt = torch.load(tmp_path / "sae" / "checkpoint.pt", weights_only=False)
    assert ckpt["sae"]["W_enc"].is_cuda and ckpt["step"] == 40
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cli + args + ["--device", "cpu", "--resume"], env=no_gpu, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = load_file(str(saved))
    for name in on_gpu:
        assert torch.equal(resumed[name], on_gpu[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_eval_splices_the_sae_into_the_model(cache_dir, lm, tmp_path, device):
    train(TrainConfig(n_latents=256, k=16, batch_size=128, tokens=128 * 150, lr=2e-3), cache_dir, tmp_path / "sae", progress=False)
    cfg = EvalConfig(tokens=32 * 16, batch_size=4, device=device, model_dtype="float32")
    result = evaluate(tmp_path / "sae", cfg, lm=lm if device == "cpu" else None, progress=False)   # on CUDA: loads the model there
    assert result.tokens == 16 * 31 and 0 < result.l0 <= 16
    assert 0 < result.fvu < 1
    assert result.ce_zero > result.ce_clean  # zeroing the residual stream hurts
    assert result.ce_sae < result.ce_zero
    assert result.kl > 0 and abs(result.delta_ce - (result.ce_sae - result.ce_clean)) < 1e-9
    assert json.loads((tmp_path / "sae" / "eval.json").read_text())["fvu"] == result.fvu


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_buffers_are_reused_without_page_faults():
    # What keep_large_buffers is for: a training step's 64 MB encoder blocks, freed and allocated
    # again every step, must not fault on every page each time (16,384 pages per block).
    assert keep_large_buffers()

    def block():
        torch.empty(16 * 2**20).fill_(1.0)       # 64 MB, written and freed

    for _ in range(16):      # the heap grows for the first few blocks (about 9 here), then reuses them
        block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2000
