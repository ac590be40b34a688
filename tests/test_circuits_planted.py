"""A planted circuit (issue 29 item 4): in a tiny Llama, layer 1's MLP is a transcoder with one feature that reads
token X at its own position and writes token Y's unembedding direction (a copy-X-to-Y feature); every other MLP writes
nothing. The attribution graph must find it: Y is the top logit, the feature survives pruning with the path
X's embedding -> feature -> logit Y, the feature is the logit's strongest input, and with no error anywhere the
replacement score is 1. A prompt not ending in X must not have it."""

from __future__ import annotations

import torch
from torch import nn

from sae_core.circuits.attribution import AttributionConfig, attribute
from sae_core.circuits.prune import prune
from sae_core.circuits.scores import graph_scores
from sae_core.sae.transcoder import TranscoderConfig, TranscoderSAE

D, VOCAB, X, Y, F = 16, 20, 7, 13, 3


class TranscoderMLP(nn.Module):
    """An MLP that is exactly its transcoder (so its error node is zero)."""

    def __init__(self, tc: TranscoderSAE) -> None:
        super().__init__()
        self.tc = tc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tc.transcode(x)


def planted():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).double().eval()
    tcs = {}
    with torch.no_grad():
        # layer 0: an MLP and a transcoder that both write nothing
        model.model.layers[0].mlp.down_proj.weight.zero_()
        tc0 = TranscoderSAE(TranscoderConfig(d_in=D, n_latents=8, k=2, layer=0)).double()
        tc0.W_enc.zero_()
        tcs[0] = tc0
        # layer 1: feature F reads X's direction at the MLP input; the others read random directions, rarely fire
        tc1 = TranscoderSAE(TranscoderConfig(d_in=D, n_latents=8, k=2, layer=1)).double()
        layer1 = model.model.layers[1]
        e = model.model.embed_tokens.weight[X]
        x_dir = layer1.post_attention_layernorm.weight * e
        tc1.W_enc[F] = 3 * x_dir / x_dir.norm()
        tc1.b_enc.fill_(-6.0)
        W_U = model.lm_head.weight
        y_dir = W_U[Y] - W_U.mean(0)
        tc1.W_dec[F] = y_dir / y_dir.norm()
        W_U[Y] = 5 * tc1.W_dec[F]
        tcs[1] = tc1
        layer1.mlp = TranscoderMLP(tc1)
    return model, tcs


def test_planted_feature_is_found():
    model, tcs = planted()
    prompt = [2, 11, 4, 9, X]
    with torch.no_grad():
        assert int(model(torch.tensor([prompt])).logits[0, -1].argmax()) == Y
    graph = attribute(model, tcs, prompt, AttributionConfig(max_n_logits=3))
    assert graph.logit_tokens[0] == Y
    T = len(prompt)
    node = graph.feature_node(1, T - 1, F)
    assert node is not None
    logit = graph.logit_node(0)
    incoming = graph.adjacency[logit]
    assert int(abs(incoming).argmax()) == node and incoming[node] > 0
    assert graph.adjacency[node, graph.embed_node(T - 1)] > 0  # X's embedding drives the feature
    r = prune(graph)
    assert r.node_mask[node]
    assert r.edge_mask[logit, node] and r.edge_mask[node, graph.embed_node(T - 1)]
    assert r.node_influence[node] == max(r.node_influence[: graph.n_features])
    s = graph_scores(graph)
    assert abs(s.replacement - 1) < 1e-9  # the planted model has no error anywhere
    assert abs(s.completeness - 1) < 1e-9

    other = attribute(model, tcs, [2, 11, 4, 9, 5], AttributionConfig(max_n_logits=3))
    assert other.feature_node(1, T - 1, F) is None
