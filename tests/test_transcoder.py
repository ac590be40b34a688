"""Transcoders (sae/transcoder.py): the hand-written step against autograd, save and load in SAELens'
transcoder layout, the miner's view of the encoder."""

from __future__ import annotations

import json

import pytest
import torch

from sae_core.errors import SaescopeError
from sae_core.interchange import load_sae, save_sae
from sae_core.sae import ARCHITECTURES, SkipTranscoderSAE, TranscoderConfig, TranscoderSAE, fvu
from sae_core.sae.transcoder import pair


def reference_loss(tc: TranscoderSAE, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """FVU of the MLP output + AuxK, written plainly for autograd."""
    cfg = tc.cfg
    pre = x @ tc.W_enc.T + tc.b_enc
    vals, idx = pre.topk(cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    y_hat = z @ tc.W_dec + tc.b_pre
    if isinstance(tc, SkipTranscoderSAE):
        y_hat = y_hat + x @ tc.W_skip.T
    loss = fvu(y, y_hat)
    n_dead = int(dead.sum())
    if n_dead:
        e = (y - y_hat).detach()
        dead_idx = dead.nonzero().squeeze(1)
        v, i = pre[:, dead_idx].topk(min(cfg.k_aux, n_dead), dim=1)
        z_aux = torch.zeros(len(x), n_dead).scatter(1, i, v.relu())
        loss = loss + cfg.aux_coef * min(n_dead / cfg.k_aux, 1) * fvu(e, z_aux @ tc.W_dec[dead_idx])
    return loss


def randomised(cls: type[TranscoderSAE], layer: int | None = 3) -> TranscoderSAE:
    torch.manual_seed(0)
    tc = cls(TranscoderConfig(d_in=16, n_latents=64, k=4, k_aux=8, layer=layer))
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.1 * torch.randn_like(p))
        tc.normalize_decoder()
    return tc


@pytest.mark.parametrize("cls", [TranscoderSAE, SkipTranscoderSAE])
@pytest.mark.parametrize("n_dead", [0, 5, 40])
def test_step_matches_autograd(cls, n_dead):
    tc = randomised(cls)
    x, y = torch.randn(40, 16), torch.randn(40, 16) @ torch.randn(16, 16) + 0.3
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    stats = tc.loss_and_grads(pair(x, y), dead)
    ours = {n: p.grad.clone() for n, p in tc.named_parameters()}
    for p in tc.parameters():
        p.grad = None
    ref = reference_loss(tc, x, y, dead)
    ref.backward()
    assert stats.loss == pytest.approx(ref.item(), rel=1e-5)
    assert stats.n_dead == n_dead and stats.l0 <= 4
    assert set(ours) == {n for n, _ in tc.named_parameters()}
    for name, p in tc.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_step_rejects_a_batch_that_is_not_a_pair():
    tc = randomised(TranscoderSAE)
    with pytest.raises(SaescopeError, match="--transcoders"):
        tc.loss_and_grads(torch.randn(8, 16), torch.zeros(64, dtype=torch.bool))


@pytest.mark.parametrize("cls", [TranscoderSAE, SkipTranscoderSAE])
def test_save_and_load_in_saelens_transcoder_layout(cls, tmp_path):
    tc = randomised(cls)
    x = torch.randn(20, 16)
    scale = 0.25  # trained on inputs and targets times 0.25: saved, it takes and gives raw activations
    expected = tc.transcode(x * scale) / scale
    save_sae(tc, tmp_path / "tc", scale=scale, metadata={"cache": {"hook": "blocks.3.hook_mlp_in", "model": "m"}})
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == cls.saelens_architecture
    assert cfg["d_out"] == 16 and cfg["hook_name_out"] == "blocks.3.hook_mlp_out" and cfg["hook_layer_out"] == 3
    assert cfg["apply_b_dec_to_input"] is False and cfg["k"] == 4
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_mlp_in"
    loaded = load_sae(tmp_path / "tc")
    assert type(loaded.sae) is cls and loaded.sae.cfg.layer == 3
    torch.testing.assert_close(loaded.sae.transcode(x), expected, rtol=1e-5, atol=1e-5)
    assert loaded.provenance.hook == "blocks.3.hook_mlp_in"


def test_folded_input_scale_gives_the_same_outputs():
    tc = randomised(SkipTranscoderSAE)
    x = torch.randn(10, 16)
    s_in, s_out = 0.5, 4.0
    expected = tc.transcode(x * s_in) / s_out  # trained on x * s_in -> y * s_out
    tc.fold_input_scale(s_in / s_out)
    tc.b_enc.data /= s_out
    tc.b_pre.data /= s_out
    torch.testing.assert_close(tc.transcode(x), expected, rtol=1e-5, atol=1e-6)


def test_encoder_affine_is_what_the_miner_encodes():
    """The miner's encoder reads (W, bias) off the interface: a transcoder does not centre its input, an SAE does."""
    tc = randomised(TranscoderSAE)
    x = torch.randn(12, 16)
    W, bias = tc.encoder_affine()
    torch.testing.assert_close(x @ W.T + bias, tc.pre_activations(x))
    topk_cfg, topk_cls = ARCHITECTURES["topk"]
    sae = topk_cls(topk_cfg(d_in=16, n_latents=64, k=4))
    with torch.no_grad():
        sae.b_pre.normal_()
    W, bias = sae.encoder_affine()
    torch.testing.assert_close(x @ W.T + bias, sae.pre_activations(x), rtol=1e-5, atol=1e-5)
