"""LanguageModel's architecture interface on tiny random Llama, GPT-2 and Gemma models built in-process.

The final norms get random gains (and, for GPT-2, biases) so that a unit gain, a missing bias or Gemma's
1 + weight read as weight would all show. The logit-effect map is checked against the models' own forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sae_core.errors import SaescopeError
from sae_core.model import LanguageModel, _probe_norm, decoder_layers

VOCAB, D, LAYERS = 97, 32, 3


def _build(arch: str) -> tuple[nn.Module, nn.Module, nn.ModuleList]:
    """A tiny random model, its final norm and its decoder layers (as the architecture names them)."""
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**small, tie_word_embeddings=False))
        norm, layers = model.model.norm, model.model.layers
    elif arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**small, head_dim=D // 4))
        norm, layers = model.model.norm, model.model.layers
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64))
        norm, layers = model.transformer.ln_f, model.transformer.h
    with torch.no_grad():
        # Gemma scales by 1 + weight (weight starts at 0); the others by weight (starts at 1)
        norm.weight.copy_(0.5 * torch.randn(D) + (0.0 if arch == "gemma" else 1.0))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.5 * torch.randn(D))
    return model.eval(), norm, layers


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma"])
def arch(request):
    torch.manual_seed(0)
    model, norm, layers = _build(request.param)
    lm = LanguageModel(name=request.param, model=model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32)
    return request.param, lm, norm, layers


def _scale(norm: nn.Module, h: torch.Tensor, centres: bool) -> torch.Tensor:
    """The factor the norm divides by: sqrt(mean(c(h)^2) + eps), with the module's own eps."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    c = h - h.mean(-1, keepdim=True) if centres else h
    return (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _old_gain(lm: LanguageModel) -> torch.Tensor:
    """The gain sae_core/mine.py's _logit_effects used before: model.model.norm.weight, else ones (Llama layout)."""
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()
    norm = getattr(getattr(lm.model, "model", None), "norm", None)
    has_gain = norm is not None and getattr(norm, "weight", None) is not None
    return norm.weight.detach().float().cpu() if has_gain else torch.ones(W_U.shape[1])


def _old_logit_effects(lm: LanguageModel, W_dec: torch.Tensor, n_top: int, chunk: int) -> tuple[np.ndarray, ...]:
    """A copy of sae_core/mine.py's _logit_effects before this refactor."""
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()
    W = W_dec.float() * _old_gain(lm)
    out = [[], [], [], []]
    for s in range(0, len(W), chunk):
        eff = W[s:s + chunk] @ W_U.T
        tv, ti = eff.topk(n_top, dim=1)
        bv, bi = eff.topk(n_top, dim=1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv)):
            lst.append(t.numpy())
    return tuple(np.concatenate(x) for x in out)


def test_layers_vocab_and_final_norm(arch):
    name, lm, norm, layers = arch
    assert lm.layers is layers and decoder_layers(lm.model) is layers
    assert lm.n_layers == LAYERS and lm.d_model == D
    assert lm.vocab_size == VOCAB
    assert lm.unembedding.shape == (VOCAB, D)
    assert torch.equal(lm.unembedding, lm.model.get_output_embeddings().weight)
    assert lm.final_norm is norm
    assert lm._last_leaf_before_unembedding() is norm   # the generic fallback finds the same module


def test_norm_affine_is_the_modules_own_tensors(arch):
    name, lm, norm, _ = arch
    affine = lm.final_norm_affine()
    weight = norm.weight.detach().float()
    assert affine.centres == (name == "gpt2")
    assert torch.equal(affine.gain, 1 + weight if name == "gemma" else weight)   # bitwise, not just close
    assert torch.equal(affine.bias, norm.bias.detach().float() if name == "gpt2" else torch.zeros(D))


def test_forward_logits_follow_from_the_effect_map(arch):
    """In a real forward, with h the hidden state entering the final norm:
    logits = lm_head(final_norm(h)) = unembed_directions(h) / scale(h) + lm_head(final_norm(0)) (the bias' logits)."""
    name, lm, norm, _ = arch
    seen = []
    handle = norm.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    h = seen[-1].reshape(-1, D)
    head = lm.model.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(head(norm(h)), logits.reshape(-1, VOCAB), rtol=1e-5, atol=1e-5)
        constant = head(norm(torch.zeros(1, D)))   # norm(0) = its bias
    predicted = lm.unembed_directions(h) / _scale(norm, h, name == "gpt2") + constant
    torch.testing.assert_close(predicted, logits.reshape(-1, VOCAB), rtol=1e-4, atol=1e-5)


def test_effect_is_the_forwards_linearisation_at_fixed_scale(arch):
    """A step along d that leaves the normalisation scale unchanged to first order (d orthogonal to the centred
    h) moves the model's own lm_head(final_norm(.)) by eps * effect(d) / scale(h)."""
    name, lm, norm, _ = arch
    gen = torch.Generator().manual_seed(2)
    h, d = torch.randn(5, D, generator=gen) * 3, torch.randn(5, D, generator=gen)
    centre = (lambda v: v - v.mean(-1, keepdim=True)) if name == "gpt2" else (lambda v: v)
    hc = centre(h)
    d = centre(d)
    d = d - (d * hc).sum(-1, keepdim=True) / hc.pow(2).sum(-1, keepdim=True) * hc   # now the scale is flat along d
    head, eps = lm.model.get_output_embeddings(), 1e-3
    with torch.no_grad():
        step = (head(norm(h + eps * d)) - head(norm(h))) / eps
    expected = lm.unembed_directions(d) / _scale(norm, h, name == "gpt2")
    torch.testing.assert_close(step, expected, rtol=2e-2, atol=2e-3 * float(expected.abs().max()))


def test_logit_effects_against_the_old_gain_only_code(arch):
    """Llama: bitwise what mine.py's _logit_effects computed (stored demo results do not move). GPT-2 and Gemma:
    the old code (unit gain, no centring; Gemma's weight instead of 1 + weight) is wrong, and ours differs."""
    name, lm, _, _ = arch
    W_dec = torch.randn(40, D, generator=torch.Generator().manual_seed(3))
    ours = lm.logit_effects(W_dec, n_top=5, chunk=16)   # chunks of 16, 16, 8
    effects = lm.unembed_directions(W_dec)
    top, bottom = effects.topk(5, dim=1), effects.topk(5, dim=1, largest=False)
    np.testing.assert_array_equal(ours[0], top.indices.numpy())
    np.testing.assert_allclose(ours[1], top.values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours[2], bottom.indices.numpy())
    np.testing.assert_allclose(ours[3], bottom.values.numpy(), rtol=1e-5, atol=1e-6)
    old = _old_logit_effects(lm, W_dec, n_top=5, chunk=16)
    old_effects = (W_dec * _old_gain(lm)) @ lm.unembedding.float().T
    if name == "llama":
        for a, b in zip(ours, old):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        many = torch.randn(2100, D, generator=torch.Generator().manual_seed(5))   # the default chunk of 1024 rows
        for a, b in zip(lm.logit_effects(many, n_top=5), _old_logit_effects(lm, many, n_top=5, chunk=1024)):
            assert np.array_equal(a, b)
    else:
        assert not torch.allclose(effects, old_effects, rtol=1e-2, atol=1e-3)
        assert not all(np.array_equal(a, b) for a, b in zip(ours[::2], old[::2]))   # the token lists move too


def test_probe_reads_norms_by_behaviour_not_class():
    torch.manual_seed(4)
    rms = nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(D))
    affine = _probe_norm(rms.to(torch.bfloat16), D)   # a bf16 module is probed in float32
    assert not affine.centres and torch.equal(affine.gain, rms.weight.float()) and torch.equal(affine.bias, torch.zeros(D))
    plain = _probe_norm(nn.LayerNorm(D, elementwise_affine=False), D)
    assert plain.centres and torch.equal(plain.gain, torch.ones(D)) and torch.equal(plain.bias, torch.zeros(D))

    class Doubled(nn.Module):   # a gain that is none of the module's tensors: the fitted value is used
        def forward(self, x):
            return 2 * x * x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()

    torch.testing.assert_close(_probe_norm(Doubled(), D).gain, torch.full((D,), 2.0))
    for not_a_norm in (nn.Identity(), nn.Linear(D, D), nn.Linear(D, 3)):
        with pytest.raises(SaescopeError, match="neither an RMSNorm nor a LayerNorm"):
            _probe_norm(not_a_norm, D)
