"""Attribution graphs (issue 29 items 2, 4) on a tiny in-process Llama (grouped key/value heads, float64) with
transcoders trained for a few steps: the replacement model reproduces the logits, and the edges equal finite
differences of the frozen linear model."""

from __future__ import annotations

import pytest
import torch

from sae_core.circuits.attribution import AttributionConfig, GraphTimeLimit, attribute, attribute_with_model
from sae_core.circuits.replacement import ReplacementModel
from sae_core.errors import SaescopeError
from sae_core.sae.transcoder import SkipTranscoderSAE, TranscoderConfig, TranscoderSAE

D, LAYERS, VOCAB = 32, 3, 50


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).double().eval()


def trained_transcoders(model, skip: bool, steps: int = 30, seed: int = 0) -> dict[int, TranscoderSAE]:
    """One transcoder per layer, trained a few Adam steps on (MLP input, MLP output) of random prompts."""
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (8, 12))
    grabbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o, L=L: grabbed.__setitem__(L, (a[0].detach(), o.detach())))
        for L, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = {}
    for L in range(LAYERS):
        cls = SkipTranscoderSAE if skip else TranscoderSAE
        tc = cls(TranscoderConfig(d_in=D, n_latents=96, k=6, layer=L)).double()
        if skip:
            with torch.no_grad():
                tc.W_skip.normal_(0, 0.05)
        x, y = (t.reshape(-1, D) for t in grabbed[L])
        opt = torch.optim.Adam(tc.parameters(), lr=3e-3)
        for _ in range(steps):
            opt.zero_grad()
            ((tc.transcode(x) - y) ** 2).sum(-1).mean().backward()
            opt.step()
        out[L] = tc.eval()
    return out


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "skip"])
def setup(request, llama):
    return llama, trained_transcoders(llama, skip=request.param)


PROMPT = [3, 17, 5, 42, 9, 11, 30, 2]


def test_manual_forward_matches_model_and_replacement_reproduces_logits(setup):
    model, tcs = setup
    ids = torch.tensor(PROMPT)
    rm = ReplacementModel(model, tcs, ids)
    with torch.no_grad():
        real = model(ids[None]).logits[0]
    # the recorded pass is the model's own: 1e-6 absolute (logits here are O(0.1-1)), since transformers' RMSNorm and
    # softmax compute in float32 even in a float64 model (measured 2e-8)
    assert (rm.logits - real).abs().max().item() < 1e-6
    # the replacement with its error nodes reproduces the recorded pass to float64 rounding (1e-10), hence the model's
    # logits to 1e-6
    assert (rm.replacement_logits() - rm.logits).abs().max().item() < 1e-10
    assert (rm.replacement_logits() - real).abs().max().item() < 1e-6
    # the error nodes matter: without them the replacement does not reproduce the logits
    assert max(s.error.abs().max().item() for s in rm.states) > 1e-3


def _frozen_target(rm: ReplacementModel, embed, writes, layer, pos, direction) -> float:
    with torch.no_grad():
        mlp_ins, final = rm.frozen_forward(embed[None], [w[None] for w in writes], None)
        vec = final[0, pos] if layer is None else mlp_ins[layer][0, pos]
        return float(vec @ direction)


def test_edges_equal_finite_differences_and_sum_to_the_target(setup):
    model, tcs = setup
    graph, rm = attribute_with_model(model, tcs, PROMPT, AttributionConfig(batch_size=7))
    A = torch.tensor(graph.adjacency, dtype=torch.float64)
    T = graph.n_pos
    writes = rm.constant_writes()
    W_U = rm.unembed.weight.detach()
    logit_dir = W_U[graph.logit_tokens[0]] - W_U.mean(0)
    # targets: the first logit and a few features of the last layer, and one in layer 1
    last = [i for i in range(graph.n_features) if graph.features[i, 0] == LAYERS - 1][:3]
    mid = [i for i in range(graph.n_features) if graph.features[i, 0] == 1][:1]
    targets = [(graph.logit_node(0), None, T - 1, logit_dir)]
    for i in last + mid:
        L, p, f = (int(v) for v in graph.features[i])
        targets.append((i, L, p, tcs[L].W_enc.detach()[f]))
    eps = 1e-3
    checked = 0
    for row, L, p, direction in targets:
        base = _frozen_target(rm, rm.embed, writes, L, p, direction)
        # a feature source: scale its activation by (1 + eps); the change / eps is its edge (the model is linear)
        for src in range(graph.n_features):
            sL, sp, sf = (int(v) for v in graph.features[src])
            if L is not None and sL >= L:
                assert A[row, src] == 0
                continue
            a = graph.activations[src]
            w2 = [w.clone() for w in writes]
            w2[sL][sp] += eps * a * tcs[sL].W_dec.detach()[sf]
            fd = (_frozen_target(rm, rm.embed, w2, L, p, direction) - base) / eps
            assert abs(fd - A[row, src].item()) < 1e-6 * (1 + abs(fd)), (row, src, fd, A[row, src].item())
            checked += 1
        # error nodes and embeddings the same way
        for sL in range(LAYERS if L is None else L):
            for sp in range(T):
                w2 = [w.clone() for w in writes]
                w2[sL][sp] += eps * rm.states[sL].error[sp]
                fd = (_frozen_target(rm, rm.embed, w2, L, p, direction) - base) / eps
                assert abs(fd - A[row, graph.error_node(sL, sp)].item()) < 1e-6 * (1 + abs(fd))
        for sp in range(T):
            e2 = rm.embed.clone()
            e2[sp] *= 1 + eps
            fd = (_frozen_target(rm, e2, writes, L, p, direction) - base) / eps
            assert abs(fd - A[row, graph.embed_node(sp)].item()) < 1e-6 * (1 + abs(fd))
        # completeness of the decomposition: every source's edge plus what the biases alone give is the target
        zero_writes = [torch.zeros_like(w) + tcs[k].b_pre.detach() for k, w in enumerate(writes)]
        bias_only = _frozen_target(rm, torch.zeros_like(rm.embed), zero_writes, L, p, direction)
        # the adjacency is float32 and its edges cancel (up to 1e3 here against a target of 0.2): relative to sum |edges|
        assert abs(A[row].sum().item() + bias_only - base) < 1e-6 * (1 + A[row].abs().sum().item())
    assert checked > 20


def test_logits_chosen_by_cumulative_probability(setup):
    model, tcs = setup
    graph = attribute(model, tcs, PROMPT, AttributionConfig(max_n_logits=5, desired_logit_prob=0.2))
    probs = graph.logit_probabilities
    assert 1 <= len(probs) <= 5
    assert probs == sorted(probs, reverse=True)
    assert sum(probs[:-1]) < 0.2 and (sum(probs) >= 0.2 or len(probs) == 5)


def test_bad_input_and_time_limit(setup):
    model, tcs = setup
    with pytest.raises(SaescopeError, match="at most 4"):
        attribute(model, tcs, PROMPT, AttributionConfig(max_prompt_tokens=4))
    with pytest.raises(SaescopeError, match="desired_logit_prob"):
        AttributionConfig(desired_logit_prob=1.5)
    with pytest.raises(SaescopeError, match="token ids"):
        attribute(model, tcs, [1, VOCAB + 3])
    with pytest.raises(SaescopeError, match="missing layers"):
        attribute(model, {0: tcs[0]}, PROMPT)
    seen: list[tuple[int, int]] = []
    attribute(model, tcs, PROMPT, AttributionConfig(batch_size=5), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    with pytest.raises(GraphTimeLimit, match="time limit"):
        attribute(model, tcs, PROMPT, AttributionConfig(batch_size=1, time_limit_s=1e-9))
