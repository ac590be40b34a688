"""The TopK SAE's hand-written sparse backward against autograd, the ReLU baseline, and interchange."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import DEVICES
from sae_core.errors import SaescopeError
from sae_core.interchange import import_checkpoint, load_sae, save_sae
from sae_core.sae import ReluConfig, ReluSAE, TopKConfig, TopKSAE, fvu


def reference_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The TopK loss of the README (FVU + AuxK / 32) written plainly, for autograd to differentiate."""
    cfg = sae.cfg
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc

    def recon(k):
        vals, idx = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        return z @ sae.W_dec + sae.b_pre

    x_hat = recon(cfg.k)
    loss = fvu(x, x_hat)
    if cfg.multi_topk:
        loss = loss + fvu(x, recon(4 * cfg.k)) / 8
    n_dead = int(dead.sum())
    if n_dead:
        e = (x - x_hat).detach()
        dead_idx = dead.nonzero().squeeze(1)
        vals, idx = pre[:, dead_idx].topk(min(cfg.k_aux, n_dead), dim=1)
        z_aux = torch.zeros(len(x), n_dead, device=x.device).scatter(1, idx, vals.relu())
        loss = loss + cfg.aux_coef * min(n_dead / cfg.k_aux, 1) * fvu(e, z_aux @ sae.W_dec[dead_idx])
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("n_dead", [0, 7, 60])
def test_sparse_backward_matches_autograd(multi_topk, n_dead, device):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=24, n_latents=96, k=4, k_aux=12, multi_topk=multi_topk))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    sae.to(device)
    x = torch.randn(50, 24).to(device)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:n_dead]] = True
    dead = dead.to(device)
    stats = sae.loss_and_grads(x, dead)
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    for p in sae.parameters():
        p.grad = None
    ref = reference_loss(sae, x, dead)
    ref.backward()
    assert stats.loss == pytest.approx(ref.item(), rel=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    if n_dead:
        assert ours["W_enc"][dead].abs().sum() > 0, "AuxK must train the encoder of dead latents"
    assert stats.l0 <= 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_bf16_without_bf16_hardware_matches_a_bf16_gemm(monkeypatch, arch, device):
    """On CPUs without bf16 units the bf16 option runs an fp32 GEMM over bf16-rounded operands; it must
    give what PyTorch's bf16 GEMM gives (same rounding, fp32 accumulation), not the fp32 result: for
    TopK's hand-written backward and for the ReLU baseline's autograd one alike. The ReLU backward's bf16
    GEMMs also round their incoming gradient to bf16, the rounded path does not, so there the two agree
    in norm (measured 2e-5 relative, on AVX2 and AVX512-BF16 CPUs) rather than in every element: where
    sums cancel, one element can differ by 14% of its tiny value."""
    import sae_core.sae.base as base

    torch.manual_seed(0)
    if arch == "topk":
        sae = TopKSAE(TopKConfig(d_in=64, n_latents=256, k=8, k_aux=16))
    else:
        sae = ReluSAE(ReluConfig(d_in=64, n_latents=256, l1_coef=1e-3))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    sae.to(device)
    x = torch.randn(200, 64).to(device)
    dead = torch.zeros(256, dtype=torch.bool, device=device)
    dead[:40] = True
    grads = {}
    for mode, native in (("bf16 gemm", True), ("rounded fp32 gemm", False), ("fp32", None)):
        monkeypatch.setattr(base, "native_bf16", lambda _device, native=native: native)
        stats = sae.loss_and_grads(x, dead, autocast_bf16=native is not None)
        grads[mode] = (stats.loss, torch.cat([p.grad.flatten() for p in sae.parameters()]), sae.W_dec.grad[:40].clone())
    (loss_native, g_native, aux_native), (loss_rounded, g_rounded, aux_rounded), (loss_fp32, g_fp32, aux_fp32) = grads.values()
    assert loss_rounded == pytest.approx(loss_native, rel=1e-6)
    if arch == "topk":
        torch.testing.assert_close(g_rounded, g_native, rtol=1e-4, atol=1e-7)
    else:
        assert (g_rounded - g_native).norm() < 1e-3 * g_native.norm()
    assert (g_fp32 - g_native).abs().max() > 10 * (g_rounded - g_native).abs().max(), "bf16 rounding must show"
    assert loss_fp32 != loss_native
    if arch == "topk":   # the dead latents' decoder gradient comes from AuxK's products, which run in bf16 too
        assert (aux_fp32 - aux_native).abs().max() > 10 * (aux_rounded - aux_native).abs().max()


def test_decoder_stays_unit_norm_and_gradient_parallel_part_is_removed():
    sae = TopKSAE(TopKConfig(d_in=16, n_latents=64, k=4))
    sae.loss_and_grads(torch.randn(32, 16), torch.zeros(64, dtype=torch.bool))
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)  # tied init


def test_bad_k_is_refused():
    with pytest.raises(SaescopeError, match="k must be between"):
        TopKConfig(d_in=8, n_latents=32, k=32)
    with pytest.raises(SaescopeError, match="4k <= n_latents"):
        TopKConfig(d_in=8, n_latents=32, k=10, multi_topk=True)


def _trained_like(sae):
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_pre.normal_(0, 1)
    return sae


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_saved_sae_takes_raw_activations(tmp_path, arch):
    torch.manual_seed(1)
    sae = _trained_like(TopKSAE(TopKConfig(d_in=16, n_latents=64, k=5)) if arch == "topk" else ReluSAE(ReluConfig(d_in=16, n_latents=64)))
    scale = 0.125
    x_raw = torch.randn(40, 16) * 8
    z_norm = sae.encode(x_raw * scale)
    xhat_norm = sae(x_raw * scale)
    save_sae(sae, tmp_path / "sae", scale=scale, metadata={"cache": {"model": "m", "hook": "blocks.1.hook_resid_post"}})
    loaded, cfg = load_sae(tmp_path / "sae")
    assert cfg["architecture"] == ("topk" if arch == "topk" else "standard") and cfg["d_sae"] == 64
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    torch.testing.assert_close(loaded.encode(x_raw), z_norm / scale, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded(x_raw), xhat_norm / scale, rtol=1e-4, atol=1e-4)


def test_importers_give_the_same_encodings(tmp_path):
    torch.manual_seed(2)
    sae = _trained_like(TopKSAE(TopKConfig(d_in=16, n_latents=64, k=5)))
    x = torch.randn(30, 16)
    expected = sae.encode(x)
    # sparsify: cfg.json + sae.safetensors with encoder.weight [M, d], encoder.bias, W_dec [M, d], b_dec
    sp = tmp_path / "sparsify"
    sp.mkdir()
    save_file({"encoder.weight": sae.W_enc.detach().clone(), "encoder.bias": sae.b_enc.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_pre.detach().clone()}, str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"k": 5, "num_latents": 64, "d_in": 16}))
    # OpenAI: state_dict with pre_bias, encoder.weight [n, d], latent_bias, decoder.weight [d, n], TopK activation
    oa = tmp_path / "openai.pt"
    torch.save({"pre_bias": sae.b_pre.detach(), "encoder.weight": sae.W_enc.detach(), "latent_bias": sae.b_enc.detach(),
                "decoder.weight": sae.W_dec.detach().T.contiguous(), "activation": "TopK",
                "activation_state_dict": {"k": torch.tensor(5)}}, oa)
    save_sae(sae, tmp_path / "ours")
    for src in (sp, oa, tmp_path / "ours"):
        out = import_checkpoint(src, tmp_path / f"imported-{src.stem}", model="m", hook="blocks.0.hook_resid_post")
        loaded, _ = load_sae(out)
        torch.testing.assert_close(loaded.encode(x), expected, msg=str(src))
    with pytest.raises(SaescopeError, match="not a SAELens folder"):
        import_checkpoint(tmp_path, tmp_path / "x")


def test_one_loader_reads_provenance_of_every_format(tmp_path):
    """Our folders, native SAELens folders and imports resolve through load_sae with one set of rules."""
    from sae_core.interchange import provenance

    sae = TopKSAE(TopKConfig(d_in=16, n_latents=64, k=5))
    cache = {"model": "m", "hook": "blocks.1.hook_resid_post", "corpus": "demo:sotu", "context_size": 64, "skip_positions": 2, "seed": 3}
    ours = save_sae(sae, tmp_path / "ours", metadata={"cache": cache, "cache_windows": 40, "activations": str(tmp_path / "cache")})
    p = load_sae(ours).provenance
    assert (p.model, p.hook, p.corpus, p.context_size, p.skip_positions, p.seed, p.trained_windows) == \
        ("m", "blocks.1.hook_resid_post", "demo:sotu", 64, 2, 3, 40)
    assert p.activations == str(tmp_path / "cache") and p.source_format == "saescope"
    # a folder SAELens wrote: only its own metadata fields
    native = save_sae(sae, tmp_path / "native")
    cfg = json.loads((native / "cfg.json").read_text())
    cfg["metadata"] = {"model_name": "gpt2", "hook_name": "blocks.4.hook_resid_post", "context_size": 256}
    (native / "cfg.json").write_text(json.dumps(cfg))
    p = load_sae(native).provenance
    assert (p.model, p.hook, p.context_size, p.source_format, p.activations) == ("gpt2", "blocks.4.hook_resid_post", 256, "saelens", None)
    assert p.require(native) == ("gpt2", "blocks.4.hook_resid_post")
    # imports keep it, or set it
    again = load_sae(import_checkpoint(ours, tmp_path / "re-imported")).provenance
    assert (again.model, again.corpus, again.trained_windows, again.source_format) == ("m", "demo:sotu", 40, "saescope")
    cfg["metadata"] = {}
    (native / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaescopeError, match=r"which model it reads \(metadata.model_name\) and which hook .*saescope import"):
        load_sae(native).provenance.require(native)
    fixed = load_sae(import_checkpoint(native, tmp_path / "fixed", model="m2", hook="blocks.0.hook_resid_post")).provenance
    assert fixed.require(tmp_path / "fixed") == ("m2", "blocks.0.hook_resid_post")
    assert provenance({"metadata": {"saescope": {"cache": {"streamed": True}, "activations": "streamed from the model"}}}).activations is None
