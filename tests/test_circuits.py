"""Attribution graphs (issue 29 items 2, 4, 5) on a tiny in-process Llama (grouped key/value heads, float64) with
transcoders trained for a few steps: the replacement model reproduces the logits, the edges equal finite
differences of the frozen linear model and autograd through it, and a cap on feature nodes keeps the most
influential ones (a cap at or above the active features gives the full graph exactly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_core.circuits.attribution import AttributionConfig, GraphTimeLimit, attribute, attribute_with_model
from sae_core.circuits.graph import AttributionGraph
from sae_core.circuits.prune import normalize_rows, prune
from sae_core.circuits.replacement import ReplacementModel
from sae_core.circuits.scores import graph_scores
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
    with pytest.raises(SaescopeError, match="max_feature_nodes"):
        AttributionConfig(max_feature_nodes=-1)
    with pytest.raises(SaescopeError, match="update_interval"):
        AttributionConfig(update_interval=0)
    with pytest.raises(SaescopeError, match="token ids"):
        attribute(model, tcs, [1, VOCAB + 3])
    with pytest.raises(SaescopeError, match="missing layers"):
        attribute(model, {0: tcs[0]}, PROMPT)
    seen: list[tuple[int, int]] = []
    attribute(model, tcs, PROMPT, AttributionConfig(batch_size=5), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    with pytest.raises(GraphTimeLimit, match="time limit"):
        attribute(model, tcs, PROMPT, AttributionConfig(batch_size=1, time_limit_s=1e-9))


def _autograd_rows(rm: ReplacementModel, graph: AttributionGraph) -> torch.Tensor:
    """The full adjacency the slow way (a reference): for each target, autograd through the frozen forward on zero
    writes, then the same dot products with the sources."""
    T, d = rm.n_pos, rm.embed.shape[-1]
    W_U = rm.unembed.weight.detach()
    A = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.float64)
    targets = [(graph.logit_node(j), None, T - 1, W_U[t] - W_U.mean(0)) for j, t in enumerate(graph.logit_tokens)]
    for i, (L, p, f) in enumerate(graph.features.tolist()):
        targets.append((i, L, p, rm.transcoders[L].W_enc.detach()[f]))
    for row, L, p, direction in targets:
        embed = torch.zeros(1, T, d, dtype=torch.float64, requires_grad=True)
        writes = [torch.zeros(1, T, d, dtype=torch.float64, requires_grad=True) for _ in range(rm.n_layers)]
        with torch.enable_grad():
            mlp_ins, final = rm.frozen_forward(embed, writes, None)
            vec = final[0, p] if L is None else mlp_ins[L][0, p]
            grads = torch.autograd.grad(vec @ direction, [embed, *writes], allow_unused=True)
        g_embed, g_writes = grads[0], grads[1:]
        A[row, graph.embed_node(0) : graph.embed_node(0) + T] = (g_embed[0] * rm.embed).sum(-1)
        for sL, g in enumerate(g_writes):
            if g is None:
                continue
            A[row, graph.error_node(sL, 0) : graph.error_node(sL, 0) + T] = (g[0] * rm.states[sL].error).sum(-1)
            for src, (fL, fp, ff) in enumerate(graph.features.tolist()):
                if fL == sL:
                    A[row, src] = graph.activations[src] * (g[0, fp] @ rm.transcoders[sL].W_dec.detach()[ff])
    return A


def test_transposed_pass_equals_autograd(setup):
    model, tcs = setup
    graph, rm = attribute_with_model(model, tcs, PROMPT, AttributionConfig(batch_size=5))
    reference = _autograd_rows(rm, graph)
    A = torch.tensor(graph.adjacency, dtype=torch.float64)
    # float32 storage of float64 values: 1e-6 relative to the row's largest edge
    scale = reference.abs().amax(1, keepdim=True).clamp_min(1e-12)
    assert ((A - reference).abs() / scale).max().item() < 1e-6
    assert (reference != 0).sum() > 100


def test_cap_at_or_above_the_active_features_is_the_full_graph(setup):
    model, tcs = setup
    full = attribute(model, tcs, PROMPT, AttributionConfig(max_feature_nodes=None, batch_size=6))
    n = full.n_features
    assert full.meta["active_features"] == n and full.meta["dropped_edge_share"] == 0.0
    for cap in (n, n + 50):
        g = attribute(model, tcs, PROMPT, AttributionConfig(max_feature_nodes=cap, batch_size=6))
        assert np.array_equal(g.adjacency, full.adjacency) and np.array_equal(g.features, full.features)
        assert np.array_equal(g.activations, full.activations) and g.logit_tokens == full.logit_tokens


def test_position_0_left_out_keeps_every_other_edge(setup):
    """attribute_position_0=False (`saescope trace`'s default, as circuit-tracer): no feature node at position 0, its
    error nodes without edges, and every edge between the remaining nodes as in the complete graph."""
    model, tcs = setup
    full = attribute(model, tcs, PROMPT, AttributionConfig(max_feature_nodes=None))
    part = attribute(model, tcs, PROMPT, AttributionConfig(max_feature_nodes=None, attribute_position_0=False))
    assert part.meta["attribute_position_0"] is False and full.meta["attribute_position_0"] is True
    assert (full.features[:, 1] == 0).any() and not (part.features[:, 1] == 0).any()
    kept = np.nonzero(full.features[:, 1] > 0)[0]
    assert np.array_equal(full.features[kept], part.features)
    F, T = full.n_features, full.n_pos
    # the full graph's nodes that the partial one has: its features past position 0, then errors, tokens, logits
    common = np.concatenate([kept, np.arange(F, full.adjacency.shape[0])])
    A = full.adjacency[np.ix_(common, common)].copy()
    pos0_errors = part.n_features + np.arange(full.n_layers) * T  # error node (layer, position 0)
    assert not part.adjacency[:, pos0_errors].any()
    A[:, pos0_errors] = 0
    np.testing.assert_allclose(part.adjacency, A, rtol=1e-5, atol=1e-7 * np.abs(A).max())


def test_capped_graph_keeps_the_most_influential_features(setup):
    model, tcs = setup
    full = attribute(model, tcs, PROMPT, AttributionConfig(max_feature_nodes=None))
    n_logits, n_feat = full.n_logits, full.n_features
    # cap 4 in one round of 4: after the logits' rows the influence estimate is each feature's direct share of the
    # logits' normalised inputs, so the 4 kept are the top 4 of it in the full graph
    logit_rows = slice(full.n_nodes - n_logits, full.n_nodes)
    direct = (np.asarray(full.logit_probabilities) @ normalize_rows(full.adjacency[logit_rows]))[:n_feat]
    top4 = set(np.argsort(-direct)[:4].tolist())
    seen: list[tuple[int, int]] = []
    small = attribute(
        model, tcs, PROMPT, AttributionConfig(max_feature_nodes=4, batch_size=4, update_interval=1), lambda d, t: seen.append((d, t))
    )
    assert {full.feature_node(*f) for f in small.features.tolist()} == top4
    assert seen[-1] == (n_logits + 4, n_logits + 4)

    # a cap needing several rounds: the kept rows and columns are the full graph's (edges from dropped features gone)
    cap = n_feat // 3
    g = attribute(model, tcs, PROMPT, AttributionConfig(max_feature_nodes=cap, batch_size=4, update_interval=2))
    assert g.n_features == cap and g.n_nodes == full.n_nodes - (n_feat - cap)
    keep = [full.feature_node(*f) for f in g.features.tolist()]
    assert None not in keep and keep == sorted(keep)  # kept in the full graph's node order
    index = np.array(keep + list(range(n_feat, full.n_nodes)))
    expected = full.adjacency[np.ix_(index, index)]
    assert np.allclose(g.adjacency, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
    dropped = np.setdiff1d(np.arange(n_feat), keep)
    read = np.array(keep + list(range(full.n_nodes - n_logits, full.n_nodes)))
    share = np.abs(full.adjacency[np.ix_(read, dropped)]).sum() / np.abs(full.adjacency[read]).sum()
    assert g.meta["dropped_edge_share"] == pytest.approx(share, rel=1e-4)
    assert 0 < g.meta["dropped_influence_share"] < 1
    # the influence-ranked cap keeps more of the logits' influence than the same number of features taken in order
    inf = prune(full).node_influence[:n_feat]
    assert inf[keep].sum() > inf[:cap].sum()
    # a capped graph is a graph like any other: pruning, scores and JSON work on it
    assert prune(g).n_nodes > 0 and 0 <= graph_scores(g).completeness <= 1
    again = AttributionGraph.from_json(json.loads(json.dumps(g.to_json())))
    assert np.array_equal(again.adjacency, g.adjacency) and again.meta == g.meta
