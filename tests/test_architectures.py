"""BatchTopK, JumpReLU and Matryoshka BatchTopK: hand-written gradients against autograd of the losses
written plainly, training on the tiny cache, bitwise resume, save/load, mining, and the real sae-lens
reading what we save (tests/saelens_env.py: its own venv)."""

from __future__ import annotations

import json

import pytest
import saelens_env
import torch
from conftest import tiny_cache
from safetensors.torch import load_file

from sae_core.interchange import load_sae, load_sae_bytes, sae_bytes, save_sae
from sae_core.sae import (
    ARCHITECTURES,
    BatchTopKConfig,
    BatchTopKSAE,
    JumpReLUConfig,
    MatryoshkaConfig,
    fvu,
)
from sae_core.train import TrainConfig, Trainer, train

NEW = ["batchtopk", "jumprelu", "matryoshka_batchtopk"]


def random_sae(arch: str, d: int = 32, n: int = 256, seed: int = 0, **settings):
    torch.manual_seed(seed)
    config_cls, sae_cls = ARCHITECTURES[arch]
    sae = sae_cls(config_cls(d_in=d, n_latents=n, **settings))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.3)
    return sae


# ---------------------------------------------------------------------------------------------- gradients


def reference_batchtopk_loss(sae: BatchTopKSAE, x: torch.Tensor, dead: torch.Tensor):
    """BatchTopK / Matryoshka as defined: the k * B largest positive pre-activations of the batch, then the
    sum over prefixes of each prefix's FVU, plus AuxK (as TopK's). Returns (loss, [prefix FVUs])."""
    cfg = sae.cfg
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.relu().flatten().topk(int(cfg.k * len(x)))
    z = torch.zeros(pre.numel()).scatter(0, idx, vals).view_as(pre)
    terms = [fvu(x, z[:, :m] @ sae.W_dec[:m] + sae.b_pre) for m in sae.prefix_sizes()]
    loss = sum(terms)
    n_dead = int(dead.sum())
    if n_dead:
        e = (x - (z @ sae.W_dec + sae.b_pre)).detach()
        dead_idx = dead.nonzero().squeeze(1)
        v, i = pre[:, dead_idx].topk(min(cfg.k_aux, n_dead), dim=1)
        z_aux = torch.zeros(len(x), n_dead).scatter(1, i, v.relu())
        loss = loss + cfg.aux_coef * min(n_dead / cfg.k_aux, 1) * fvu(e, z_aux @ sae.W_dec[dead_idx])
    return loss, terms


def grads_of(sae) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 40])
def test_batchtopk_gradients_match_autograd(arch, n_dead):
    settings = {"k": 6, "k_aux": 16} | ({"prefix_sizes": [16, 64]} if arch != "batchtopk" else {})
    sae = random_sae(arch, **settings)
    torch.manual_seed(1)
    x = torch.randn(300, 32)
    # one position aligned with 100 encoder rows: it holds far more than its CANDIDATES * k candidates
    x[0] = 20 * torch.nn.functional.normalize(sae.W_enc[:100].detach().sum(0), dim=0)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[torch.randperm(256)[:n_dead]] = True
    with torch.no_grad():
        rows, _, _, _ = sae._select(x - sae.b_pre, sae.W_enc.T, sae.b_enc, None, dead.nonzero().squeeze(1))
    assert int((rows == 0).sum()) > 4 * 6, "the saturated row must keep more than its candidates"
    threshold_before = float(sae.threshold)
    stats = sae.loss_and_grads(x, dead)
    ours = grads_of(sae)
    assert float(sae.threshold) > threshold_before  # moved towards the smallest kept activation
    sae.zero_grad()
    with torch.enable_grad():
        loss, terms = reference_batchtopk_loss(sae, x, dead)
        loss.backward()
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    assert stats.fvu == pytest.approx(terms[-1].item(), rel=1e-5)  # the whole dictionary's FVU
    assert stats.l0 == pytest.approx(6.0, abs=0.01)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_matryoshka_loss_is_the_sum_of_its_prefix_losses():
    sae = random_sae("matryoshka_batchtopk", k=6, prefix_sizes="16,64", aux_coef=0.0)
    assert sae.prefix_sizes() == [16, 64, 256]
    x = torch.randn(200, 32)
    with torch.no_grad():
        _, terms = reference_batchtopk_loss(sae, x, torch.zeros(256, dtype=torch.bool))
    stats = sae.loss_and_grads(x, torch.zeros(256, dtype=torch.bool))
    assert len(terms) == 3 and len({round(float(t), 4) for t in terms}) == 3  # three different reconstructions
    assert stats.loss == pytest.approx(float(sum(terms)), rel=1e-5)
    plain = random_sae("batchtopk", k=6, aux_coef=0.0)
    assert plain.loss_and_grads(x, torch.zeros(256, dtype=torch.bool)).loss == pytest.approx(float(terms[-1]), rel=1e-5)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).float()


class JumpReLUFunction(torch.autograd.Function):
    """z = x H(x - theta); the paper's straight-through estimator dz/dtheta = -(theta / eps) K((x - theta) / eps)."""

    @staticmethod
    def forward(ctx, x, theta, eps):
        ctx.save_for_backward(x, theta)
        ctx.eps = eps
        return x * (x > theta)

    @staticmethod
    def backward(ctx, g):
        x, theta = ctx.saved_tensors
        return (x > theta) * g, (-(theta / ctx.eps) * rectangle((x - theta) / ctx.eps) * g).sum(0), None


class StepFunction(torch.autograd.Function):
    """H(x - theta), with dH/dtheta = -(1 / eps) K((x - theta) / eps) and no gradient into x."""

    @staticmethod
    def forward(ctx, x, theta, eps):
        ctx.save_for_backward(x, theta)
        ctx.eps = eps
        return (x > theta).float()

    @staticmethod
    def backward(ctx, g):
        x, theta = ctx.saved_tensors
        return None, (-(1 / ctx.eps) * rectangle((x - theta) / ctx.eps) * g).sum(0), None


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_jumprelu_threshold_gradient_is_the_straight_through_estimators(path):
    sae = random_sae("jumprelu", l0_coef=0.01, bandwidth=0.2, init_threshold=0.5)
    with torch.no_grad():
        sae.log_threshold.add_(0.3 * torch.randn(256))
    sae.DENSE_ABOVE = 1.1 if path == "sparse" else 0.0
    x = torch.randn(300, 32)
    stats = sae.loss_and_grads(x, torch.zeros(256, dtype=torch.bool))
    ours = grads_of(sae)
    sae.zero_grad()
    with torch.enable_grad():
        theta, eps = sae.log_threshold.exp(), sae.cfg.bandwidth
        pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
        in_window = int(((pre - theta).abs() < eps / 2).sum())
        z = JumpReLUFunction.apply(pre, theta, eps)
        loss = fvu(x, z @ sae.W_dec + sae.b_pre) + sae.cfg.l0_coef * StepFunction.apply(pre, theta, eps).sum(1).mean()
        loss.backward()
    assert in_window > 500, "the test needs entries inside the kernel's window"
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    assert stats.l0 == pytest.approx(float((pre > theta).sum(1).float().mean()))
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", NEW)
def test_bf16_step_is_the_fp32_step_in_bf16_numerics(arch):
    """--bf16: the encoder GEMM's operands and result rounded to bf16 (base.bf16_gemm), the rest as in fp32."""
    settings = {"bandwidth": 0.2, "init_threshold": 0.3} if arch == "jumprelu" else {"k": 6}
    sae = random_sae(arch, **settings)
    x = torch.randn(300, 32)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:20] = True
    fp32 = sae.loss_and_grads(x, dead)
    g32 = grads_of(sae)
    if arch != "jumprelu":
        sae.threshold.zero_()  # the same threshold update from the same start
    bf16 = sae.loss_and_grads(x, dead, autocast_bf16=True)
    assert bf16.loss == pytest.approx(fp32.loss, rel=2e-2) and bf16.loss != fp32.loss
    for name, p in sae.named_parameters():
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), g32[name].flatten(), dim=0) > 0.99, name


def test_jumprelu_l0_penalty_warms_up():
    sae = random_sae("jumprelu", l0_coef=0.01, l0_warmup_steps=100)
    sae.begin_step(0)
    assert sae.l0_coef_now == 0.0
    sae.begin_step(25)
    assert sae.l0_coef_now == pytest.approx(0.0025)
    sae.begin_step(1000)
    assert sae.l0_coef_now == pytest.approx(0.01)


def test_bad_settings_are_refused():
    from sae_core.errors import SaescopeError

    with pytest.raises(SaescopeError, match="prefix sizes must increase"):
        MatryoshkaConfig(d_in=8, n_latents=64, k=4, prefix_sizes=[32, 16])
    with pytest.raises(SaescopeError, match="whole numbers"):
        MatryoshkaConfig(d_in=8, n_latents=64, k=4, prefix_sizes="16,x")
    with pytest.raises(SaescopeError, match="bandwidth"):
        JumpReLUConfig(d_in=8, n_latents=64, bandwidth=0)
    with pytest.raises(SaescopeError, match="k must be"):
        BatchTopKConfig(d_in=8, n_latents=64, k=64)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def cache_dir(tiny_lm, tiny_model, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    return tiny_cache(tiny_lm, tiny_model, tiny_corpus, out, tokens=32 * 64)


def small_config(arch: str, **kw) -> TrainConfig:
    settings = dict(architecture=arch, n_latents=256, k=8, batch_size=128, tokens=128 * 120, lr=2e-3, checkpoint_every=1000, device="cpu")
    if arch == "jumprelu":  # a penalty that lands near L0 8 on the tiny model's activations
        settings |= dict(l0_coef=2e-2, l0_warmup_steps=20, bandwidth=0.05, init_threshold=0.05)
    return TrainConfig(**(settings | kw))


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory) -> dict:
    """Each new architecture trained on the tiny cache: {arch: TrainResult}."""
    root = tmp_path_factory.mktemp("trained")
    return {arch: train(small_config(arch), cache_dir, root / arch, progress=False) for arch in NEW}


@pytest.mark.parametrize("arch", NEW)
def test_each_architecture_learns(trained, arch):
    result = trained[arch]
    first, last = result.log[0], result.log[-1]
    assert last["fvu"] < 0.6 * first["fvu"], (first, last)
    assert last["l0"] < 30, last  # sparse: 256 latents, k 8
    loaded = load_sae(result.out)
    assert type(loaded.sae) is ARCHITECTURES[arch][1]
    torch.testing.assert_close(loaded.sae.W_dec.norm(dim=1), torch.ones(256))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_inference_threshold_gives_about_k_active(trained, cache_dir, arch):
    from sae_core.cache import ActivationCache

    sae = load_sae(trained[arch].out).sae
    x = ActivationCache(cache_dir).sample(2048, seed=1)
    with torch.no_grad():
        l0 = float((sae.encode(x) > 0).sum(1).float().mean())
    assert 0.6 * 8 <= l0 <= 1.5 * 8, l0  # k on average, by a threshold alone


@pytest.mark.parametrize("arch", NEW)
def test_resume_after_a_kill_gives_bitwise_the_same_weights(cache_dir, tmp_path, monkeypatch, arch):
    cfg = small_config(arch, tokens=128 * 30, checkpoint_every=10)
    train(cfg, cache_dir, tmp_path / "clean", progress=False)

    class Killed(Exception):
        pass

    real_step = Trainer.step

    def step_then_die(self, raw, where=""):
        if self.step_no == 17:  # past the checkpoint of step 10: steps 11..17 are lost with the process
            raise Killed
        return real_step(self, raw, where)

    monkeypatch.setattr(Trainer, "step", step_then_die)
    with pytest.raises(Killed):
        train(cfg, cache_dir, tmp_path / "killed", progress=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    resumed = train(cfg, cache_dir, tmp_path / "killed", resume=True, progress=False)
    assert resumed.resumed_from_step == 10
    a, b = load_file(str(tmp_path / "killed" / "sae_weights.safetensors")), load_file(str(tmp_path / "clean" / "sae_weights.safetensors"))
    assert set(a) == set(b) and "threshold" in a
    for name in b:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------- save, load, mine


@pytest.mark.parametrize("arch", NEW)
def test_saved_sae_takes_raw_activations_and_loads_back(tmp_path, arch):
    sae = random_sae(arch, **({} if arch == "jumprelu" else {"k": 8}))
    with torch.no_grad():
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(256).uniform_(-3, -1))
        else:
            sae.threshold.fill_(0.2)
    scale = 2.5
    save_sae(sae, tmp_path / "s", scale=scale)
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # SAELens' name for the inference form of all three
    assert cfg["metadata"]["saescope"]["architecture"] == arch
    weights = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    torch.testing.assert_close(weights["threshold"], sae.activation_thresholds().detach() / scale)
    loaded = load_sae(tmp_path / "s")
    assert type(loaded.sae) is type(sae)
    if arch == "matryoshka_batchtopk":
        assert loaded.sae.prefix_sizes() == sae.prefix_sizes()
    raw = torch.randn(500, 32) * 3
    with torch.no_grad():
        expected = sae.encode(raw * scale) / scale
        torch.testing.assert_close(loaded.sae.encode(raw), expected, rtol=1e-4, atol=1e-5)
        assert (expected > 0).any() and (expected == 0).any()
        stored = load_sae_bytes(sae_bytes(loaded))
        assert type(stored.sae) is type(sae)
        torch.testing.assert_close(stored.sae.encode(raw), loaded.sae.encode(raw))


def test_mining_a_batchtopk_sae_matches_brute_force(trained, tiny_lm, tmp_path):
    from test_mine import check_against_brute_force, small

    from sae_core.mine import mine

    url = f"sqlite:///{tmp_path / 'store.db'}"
    result = mine(trained["batchtopk"].out, small(url), lm=tiny_lm, progress=False)
    assert result.alive > 0
    check_against_brute_force(url, tiny_lm, trained["batchtopk"].out)  # codes above the threshold, as sae.encode

    # served: the live runtime runs the weights stored with the run, a BatchTopK SAE with its threshold
    from sae_core.config import LiveConfig
    from sae_core.live.runtime import LiveRuntime
    from sae_core.store import db

    engine = db.make_engine(url)
    runtime = LiveRuntime(LiveConfig(max_text_tokens=200), engine=engine, lm=tiny_lm)
    text = "The cat sat over the big red house. Then the king said that the whale ran under a blue tree."
    encoded = runtime.encode(result.sae_name, text, top=4)
    held = runtime.sae(result.sae_name)
    assert type(held.loaded.sae) is BatchTopKSAE
    with torch.no_grad():
        ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        z = held.loaded.sae.encode(tiny_lm.residuals(torch.tensor([ids]), held.layer)[0].float())
    for pos, token in enumerate(encoded.tokens[1:], start=1):
        want = [(int(i), float(v)) for v, i in zip(*z[pos].topk(4)) if v > 0]
        assert [i for i, _ in token.features] == [i for i, _ in want]
        assert [a for _, a in token.features] == pytest.approx([a for _, a in want], rel=1e-4)
    engine.dispose()


# ---------------------------------------------------------------------------------------------- the real sae-lens


def test_saelens_reads_what_we_save_and_we_read_what_it_saves(trained, cache_dir, tmp_path):
    """SAELens' `SAE.load_from_disk` loads each trained SAE (in its own venv) and encodes 2,048 cache rows
    as we do; and SAELens' own BatchTopK, Matryoshka and JumpReLU SAEs, saved by SAELens as training and
    as inference folders, load here and encode as SAELens does."""
    from sae_core.cache import ActivationCache

    python = saelens_env.python_or_skip()
    x = ActivationCache(cache_dir).sample(2048, seed=2).float().contiguous()
    report = saelens_env.roundtrip(python, {arch: trained[arch].out for arch in NEW}, x, tmp_path)
    for arch in NEW:
        ours = load_sae(trained[arch].out).sae
        with torch.no_grad():
            z = ours.encode(x)
            # a pre-activation within rounding of its latent's threshold fires on one side and not on the other
            # (SAELens sums the GEMM in another order): 1 of 507,904 codes did on a 2-core CI machine
            margin = (ours.pre_activations(x) - ours.activation_thresholds()).abs()
        theirs = report["ours"][arch]
        assert theirs["class"] == "JumpReLUSAE"
        on_edge = margin <= 2e-6 * (1 + ours.activation_thresholds().abs())  # fp32 GEMM rounding, with room
        assert float(on_edge.float().mean()) < 1e-4, arch  # a few dozen codes of 507,904 at most, or the test means nothing
        torch.testing.assert_close(theirs["z"][~on_edge], z[~on_edge], rtol=1e-4, atol=1e-5, msg=lambda m: f"{arch}: {m}")
        assert (z > 0).sum(1).float().mean() > 1
    for folder, info in report["theirs"].items():
        loaded = load_sae(tmp_path / "saelens" / folder)
        assert loaded.sae.architecture == info["expect"], folder
        with torch.no_grad():
            torch.testing.assert_close(loaded.sae.encode(x), info["z"], rtol=1e-4, atol=1e-5, msg=folder)


# ---------------------------------------------------------------------------------------------- data parallel


def test_jumprelu_data_parallel_matches_one_process(cache_dir, tmp_path):
    """Two Gloo ranks, each half of every batch (tests/test_distributed.py's harness and tolerances): JumpReLU's
    loss, L0 penalty and threshold gradients add up over ranks to the single process's."""
    from test_distributed import config, run_both

    cfg = config(architecture="jumprelu", l0_coef=2e-2, bandwidth=0.05, init_threshold=0.05, ema=None)
    ref, ref_log, got = run_both(cache_dir, tmp_path, 2, 1, cfg)
    for step, (a, b) in enumerate(zip(ref_log, got["log"])):
        for key in ("loss", "fvu", "l0"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (step, key, a, b)
    for name, value in ref.sae.state_dict().items():
        torch.testing.assert_close(got["sae"][name], value, atol=2e-4, rtol=0, msg=name)


def test_batchtopk_data_parallel_trains(cache_dir, tmp_path):
    """Under data parallelism each rank keeps k * its rows (as SAELens under DDP), so the run is not the single
    process's; the ranks still hold one threshold (their mean smallest kept activation) and k per token."""
    from test_distributed import config, run_both

    ref, ref_log, got = run_both(cache_dir, tmp_path, 2, 1, config(architecture="batchtopk", ema=None))
    assert all(entry["l0"] == pytest.approx(8.0, abs=0.01) for entry in got["log"])
    assert float(got["sae"]["threshold"]) > 0
    assert got["log"][-1]["fvu"] == pytest.approx(ref_log[-1]["fvu"], rel=0.05)  # the same training, not the same sums


@pytest.mark.parametrize("arch", NEW)
def test_eval_runs_each_architecture_at_inference(trained, tiny_lm, tmp_path, arch):
    import shutil

    from sae_core.evaluate import EvalConfig, evaluate

    folder = tmp_path / arch
    shutil.copytree(trained[arch].out, folder)
    cfg = EvalConfig(tokens=32 * 8, batch_size=4, device="cpu", model_dtype="float32", probe_per_class=0, ablation_positions=0)
    result = evaluate(folder, cfg, lm=tiny_lm, progress=False)
    assert 0 < result.l0 < 30 and 0 < result.fvu < 1  # the inference codes: thresholds, not the batch's top k
    assert result.kl > 0 and result.tokens == 8 * 31
