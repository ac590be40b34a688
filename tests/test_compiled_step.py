"""The compiled TopK step (sae_core/sae/compiled.py, `saescope train --compile`) against the eager one.

Tolerance: the compiled graph sums in another order (inductor's fused reductions, atomic scatter-adds),
so statistics and gradients agree to float32 rounding: relative 1e-5 of the largest entry on the CPU
(seen: below 1e-6), 1e-4 on a GPU; weights after four Adam steps of 1e-3 agree to 1e-6 (1e-5 on a GPU),
where a wrong gradient would move them by up to 4e-3. The bf16 case keeps fewer dead latents than k_aux,
so AuxK takes all of them: bf16 pre-activations often tie, and two correct steps may break a tie among
AuxK's candidates differently (seen with 60 dead: a 1e-3 difference in aux_fvu). On a GPU machine:

    python -m pytest -q tests/test_compiled_step.py        (the CUDA cases run when torch sees a GPU)

The first call of each configuration compiles (seconds on a GPU, 10-70 s on a busy 2-core CPU), so the
cases share a few small shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES, tiny_cache
from torch._dynamo.utils import counters

from sae_core.errors import SaescopeError
from sae_core.interchange import load_sae
from sae_core.model import load_model
from sae_core.sae import TopKConfig, TopKSAE
from sae_core.sae.compiled import MIN_DEAD_BUCKET, CompiledTopK, chunked_topk, dead_bucket
from sae_core.train import TrainConfig, train

STATS = ("loss", "fvu", "aux_fvu", "l0")


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Every test compiles afresh: the cases together hold more graphs than torch.compile keeps per function
    (8), past which it would run the step uncompiled and the comparison would test nothing."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def perturbed_sae(cfg: TopKConfig, device: str) -> TopKSAE:
    """A TopK SAE away from its tied init (non-zero biases), so every gradient term is exercised."""
    torch.manual_seed(0)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae.to(device)


def adam_step(sae: TopKSAE, opt: torch.optim.Optimizer) -> None:
    """What the trainer does after loss_and_grads."""
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()


def test_dead_bucket_pads_to_powers_of_two_within_the_dictionary():
    assert dead_bucket(0, 16384) == 0
    assert dead_bucket(1, 16384) == dead_bucket(MIN_DEAD_BUCKET, 16384) == MIN_DEAD_BUCKET
    assert dead_bucket(MIN_DEAD_BUCKET + 1, 16384) == 2 * MIN_DEAD_BUCKET
    assert dead_bucket(1638, 16384) == 2048
    assert dead_bucket(9000, 16384) == dead_bucket(16384, 16384) == 16384
    assert dead_bucket(7, 96) == 96  # never wider than the dictionary


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "multi_topk, n_dead, bf16, topk_chunks",
    [(False, 0, False, 0), (False, 7, False, 0), (True, 60, False, 0), (False, 7, True, 0), (True, 60, False, 4)],
    ids=["auxk-off", "auxk-on", "multi-topk", "bf16", "two-stage-topk"],
)
def test_compiled_step_matches_the_eager_step_over_several_steps(device, multi_topk, n_dead, bf16, topk_chunks):
    cfg = TopKConfig(d_in=24, n_latents=96, k=4, k_aux=12, multi_topk=multi_topk)
    eager = perturbed_sae(cfg, device)
    compiled = copy.deepcopy(eager)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=1e-3, eps=6.25e-10, fused=True)
    opt_compiled = torch.optim.Adam(compiled.parameters(), lr=1e-3, eps=6.25e-10, fused=True)
    step = CompiledTopK(compiled, topk_chunks=topk_chunks)
    gen = torch.Generator().manual_seed(1)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=gen)[:n_dead]] = True
    dead = dead.to(device)
    tol = 1e-5 if device == "cpu" else 1e-4
    graphs = counters["stats"]["unique_graphs"]
    for i in range(4):
        x = torch.randn(50, 24, generator=gen).to(device)
        want = eager.loss_and_grads(x, dead, autocast_bf16=bf16)
        got = step.loss_and_grads(x, dead, autocast_bf16=bf16)
        assert got.n_dead == want.n_dead == n_dead
        assert torch.equal(got.fired, want.fired), f"step {i}"
        for key in STATS:
            assert getattr(got, key) == pytest.approx(getattr(want, key), rel=tol, abs=1e-7), f"{key} at step {i}"
        if n_dead:
            assert got.aux_fvu > 0  # AuxK ran (the padding columns added nothing, checked by the gradients)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            assert relative_error(p.grad, q.grad) < tol, f"gradient of {name} at step {i}"
        adam_step(eager, opt_eager)
        adam_step(compiled, opt_compiled)
    assert counters["stats"]["unique_graphs"] > graphs, "the step ran uncompiled: the comparison tested nothing"
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=tol / 10, rtol=0, msg=f"{name} after 4 steps")


@pytest.mark.parametrize("sorted_", [False, True])
def test_two_stage_topk_selects_what_topk_selects(sorted_):
    block = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    want_vals, want_idx = block.topk(32, dim=1, sorted=sorted_)
    for chunks in (1, 4, 32):
        vals, idx = chunked_topk(block, 32, sorted_, chunks)
        assert torch.equal(block.gather(1, idx), vals)
        if sorted_:
            assert torch.equal(vals, want_vals) and torch.equal(idx, want_idx), chunks
        else:
            assert torch.equal(idx.sort(1).values, want_idx.sort(1).values), chunks


def test_two_stage_topk_needs_chunks_of_k_that_divide_the_dictionary():
    sae = TopKSAE(TopKConfig(d_in=8, n_latents=96, k=4, multi_topk=True))
    for chunks in (5, 8):  # 96 / 5 is no whole chunk; 96 / 8 = 12 < 4k
        with pytest.raises(ValueError, match="topk_chunks"):
            CompiledTopK(sae, topk_chunks=chunks)


@pytest.mark.parametrize("device", DEVICES)
def test_a_changing_dead_count_recompiles_into_the_right_bucket(device):
    """AuxK's padded width follows the dead count across buckets (and back to none) with the eager results."""
    cfg = TopKConfig(d_in=16, n_latents=1024, k=4, k_aux=8)
    eager = perturbed_sae(cfg, device)
    step = CompiledTopK(eager)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=gen).to(device)
    tol = 1e-5 if device == "cpu" else 1e-4
    for n_dead in (100, 300, 0, 700):  # buckets 256, 512, none, 1024
        dead = torch.zeros(1024, dtype=torch.bool)
        dead[torch.randperm(1024, generator=gen)[:n_dead]] = True
        dead = dead.to(device)
        want = eager.loss_and_grads(x, dead)
        want_grads = [p.grad.clone() for p in eager.parameters()]
        got = step.loss_and_grads(x, dead)
        assert got.aux_fvu == pytest.approx(want.aux_fvu, rel=tol, abs=1e-7), n_dead
        assert got.loss == pytest.approx(want.loss, rel=tol), n_dead
        for (name, p), g in zip(eager.named_parameters(), want_grads):
            assert relative_error(p.grad, g) < tol, f"gradient of {name} with {n_dead} dead"


@pytest.fixture(scope="module")
def cache_dir(tiny_model, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    lm = load_model(str(tiny_model), device="cpu", dtype="float32")
    return tiny_cache(lm, tiny_model, tiny_corpus, out, tokens=32 * 32)


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_compile_ends_where_eager_training_does(cache_dir, tmp_path, device):
    """`train --compile` through the trainer: AuxK turns on mid-run (the dead threshold is short), the
    log and the saved weights match the eager run's to float rounding."""
    common = dict(n_latents=128, k=4, batch_size=64, tokens=64 * 30, lr=1e-3, dead_tokens=64 * 8, checkpoint_every=1000, device=device)
    eager = train(TrainConfig(**common), cache_dir, tmp_path / "eager", progress=False)
    compiled = train(TrainConfig(**common, compile=True), cache_dir, tmp_path / "compiled", progress=False)
    assert any(entry["aux_fvu"] > 0 for entry in eager.log), "the run never reached AuxK"
    assert [e["n_dead"] for e in compiled.log] == [e["n_dead"] for e in eager.log]
    for got, want in zip(compiled.log, eager.log):
        assert got["fvu"] == pytest.approx(want["fvu"], rel=1e-4), got["step"]
    sae_compiled, _ = load_sae(tmp_path / "compiled")
    sae_eager, _ = load_sae(tmp_path / "eager")
    for name, p in sae_eager.state_dict().items():
        torch.testing.assert_close(sae_compiled.state_dict()[name], p, atol=1e-4, rtol=0, msg=name)


def test_compile_is_refused_where_it_does_not_apply(cache_dir, tmp_path):
    with pytest.raises(SaescopeError, match="--compile"):
        train(
            TrainConfig(architecture="relu", n_latents=64, batch_size=64, tokens=64, compile=True),
            cache_dir,
            tmp_path / "r",
            progress=False,
        )


def test_a_step_that_cannot_compile_says_so(monkeypatch, tmp_path):
    """Without a working C++ compiler (CPU) or Triton (CUDA) inductor fails: the trainer's error names --compile."""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cached kernel would need no compiler
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    sae = perturbed_sae(TopKConfig(d_in=8, n_latents=32, k=2), "cpu")
    with pytest.raises(SaescopeError, match="--compile: torch.compile could not compile"):
        CompiledTopK(sae).loss_and_grads(torch.randn(10, 8), torch.zeros(32, dtype=torch.bool))
