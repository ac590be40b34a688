"""Pruning and scores of attribution graphs (issue 29 item 2) as pure functions, on hand-made graphs whose answers
are worked out by hand or by the matrix inverse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_core.circuits.graph import AttributionGraph
from sae_core.circuits.prune import influence, logit_weights, normalize_rows, prune, pruned_graph
from sae_core.circuits.scores import graph_scores
from sae_core.errors import SaescopeError


def make_graph(n_features: int, edges: dict[tuple[str, str], float], n_layers: int = 1, n_pos: int = 2, probs=(1.0,)):
    """Nodes named f0.., e{layer}_{pos}, t{pos}, l{i}; edges {(target, source): weight}."""
    names = [f"f{i}" for i in range(n_features)]
    names += [f"e{L}_{p}" for L in range(n_layers) for p in range(n_pos)]
    names += [f"t{p}" for p in range(n_pos)] + [f"l{i}" for i in range(len(probs))]
    at = {n: i for i, n in enumerate(names)}
    A = np.zeros((len(names), len(names)), dtype=np.float32)
    for (tgt, src), w in edges.items():
        A[at[tgt], at[src]] = w
    feats = np.array([[0, min(i, n_pos - 1), i] for i in range(n_features)], dtype=np.int64).reshape(-1, 3)
    g = AttributionGraph(list(range(n_pos)), n_layers, feats, np.ones(n_features), list(range(len(probs))), list(probs), A)
    return g, at


def test_influence_is_the_indirect_effect_matrix():
    rng = np.random.default_rng(0)
    n = 9
    A = np.tril(rng.normal(size=(n, n)), k=-1)  # acyclic
    N = normalize_rows(A)
    w = rng.random(n)
    expected = w @ (np.linalg.inv(np.eye(n) - N) - np.eye(n))
    assert np.allclose(influence(N, w), expected, atol=1e-12)


def test_prune_keeps_the_strong_path_and_drops_the_weak_one():
    # logit <- f0 (9.0) <- t0 (1.0); logit <- f1 (0.5) <- t1; logit <- t1 directly (0.5); f2 feeds nothing
    g, at = make_graph(
        3, {("l0", "f0"): 9.0, ("f0", "t0"): 1.0, ("l0", "f1"): 0.5, ("f1", "t1"): 1.0, ("l0", "t1"): 0.5, ("f2", "t0"): 3.0}
    )
    r = prune(g, node_threshold=0.8, edge_threshold=0.98)
    assert r.node_mask[at["f0"]] and not r.node_mask[at["f1"]] and not r.node_mask[at["f2"]]
    assert r.node_mask[at["t0"]] and r.node_mask[at["t1"]] and r.node_mask[at["l0"]]  # tokens and logits stay
    assert r.edge_mask[at["l0"], at["f0"]] and r.edge_mask[at["f0"], at["t0"]]
    assert not r.edge_mask[at["l0"], at["f1"]]
    # influence by hand: l0's inputs normalised 0.9 / 0.05 / 0.05, f0's and f1's to 1
    assert r.node_influence[at["f0"]] == pytest.approx(0.9)
    assert r.node_influence[at["t0"]] == pytest.approx(0.9)
    assert r.node_influence[at["t1"]] == pytest.approx(0.1)
    # everything kept at share 1
    full = prune(g, 1.0, 1.0)
    assert full.node_mask[at["f1"]] and full.edge_mask[at["l0"], at["f1"]]
    assert not full.node_mask[at["f2"]]  # no influence and no outgoing edge
    p = pruned_graph(g, r)
    assert p.adjacency[at["l0"], at["f1"]] == 0 and p.adjacency[at["l0"], at["f0"]] == 9.0


def test_thresholds_out_of_range():
    g, _ = make_graph(1, {("l0", "f0"): 1.0, ("f0", "t0"): 1.0})
    for bad in (-0.1, 1.5):
        with pytest.raises(SaescopeError, match="node_threshold"):
            prune(g, node_threshold=bad)
        with pytest.raises(SaescopeError, match="edge_threshold"):
            prune(g, edge_threshold=bad)


def test_scores_by_hand():
    # only tokens through features: both scores 1
    g, _ = make_graph(1, {("l0", "f0"): 2.0, ("f0", "t0"): 1.0})
    s = graph_scores(g)
    assert s.replacement == pytest.approx(1.0) and s.completeness == pytest.approx(1.0)
    # the logit reads f0 (3) and an error (1); f0 reads t0 (1) and an error (1)
    g, at = make_graph(1, {("l0", "f0"): 3.0, ("l0", "e0_1"): -1.0, ("f0", "t0"): 1.0, ("f0", "e0_0"): 1.0})
    s = graph_scores(g)
    # influence: f0 0.75, e0_1 0.25, t0 0.375, e0_0 0.375 -> replacement 0.375 / (0.375 + 0.625)
    assert s.replacement == pytest.approx(0.375)
    # completeness: l0 (weight 1) is 3/4 non-error, f0 (influence 0.75) 1/2, the rest have no inputs (count 1)
    inf = influence(normalize_rows(g.adjacency), logit_weights(g)) + logit_weights(g)
    expected = (1 * 0.75 + 0.75 * 0.5 + inf[at["e0_1"]] + inf[at["t0"]] + inf[at["e0_0"]]) / inf.sum()
    assert s.completeness == pytest.approx(expected)
    assert 0 < s.completeness < 1


def test_graph_json_round_trip():
    g, _ = make_graph(2, {("l0", "f0"): 2.0, ("f0", "t0"): 1.0, ("f1", "t1"): 0.5}, probs=(0.7, 0.2))
    g2 = AttributionGraph.from_json(json.loads(json.dumps(g.to_json())))
    assert np.array_equal(g2.adjacency, g.adjacency) and np.array_equal(g2.features, g.features)
    assert g2.logit_probabilities == g.logit_probabilities and g2.n_nodes == g.n_nodes


def _reference_prune(graph: AttributionGraph, node_threshold: float, edge_threshold: float):
    """Pruning written plainly (float64 copies, every score sorted, zeros included): the memory-frugal prune must
    give the same masks."""

    def threshold(scores: np.ndarray, share: float) -> float:
        ordered = np.sort(scores.ravel())[::-1]
        total = ordered.sum()
        if total <= 0:
            return 0.0
        cumulative = np.cumsum(ordered) / total
        return float(ordered[min(int(np.searchsorted(cumulative, share)), len(ordered) - 1)])

    w = logit_weights(graph)
    A = graph.adjacency.astype(np.float64)
    N = np.abs(A) / np.maximum(np.abs(A).sum(1, keepdims=True), 1e-10)
    node_inf = influence(N, w)
    node_mask = node_inf >= threshold(node_inf, node_threshold)
    node_mask[graph.n_features + graph.n_errors :] = True
    kept = A * node_mask[:, None] * node_mask[None, :]
    Nk = np.abs(kept) / np.maximum(np.abs(kept).sum(1, keepdims=True), 1e-10)
    scores = Nk * (influence(Nk, w) + w)[:, None]
    return node_mask, (scores >= threshold(scores, edge_threshold)) & (kept != 0)


def test_prune_equals_the_plain_computation_on_random_graphs():
    rng = np.random.default_rng(3)
    for trial in range(4):
        n_feat, n_layers, n_pos, probs = 40, 2, 3, (0.6, 0.3)
        g, _ = make_graph(n_feat, {}, n_layers=n_layers, n_pos=n_pos, probs=probs)
        n = g.n_nodes
        # acyclic: a node reads only nodes after it in this order (features read errors, tokens and later features;
        # logits read everything before them), about a third of the pairs are edges
        A = np.tril(rng.normal(size=(n, n)) * (rng.random((n, n)) < 0.35), k=-1)[::-1, ::-1].copy()
        A[n_feat : n - len(probs)] = 0  # errors and tokens have no inputs
        A[n - len(probs) :] = rng.normal(size=(len(probs), n)) * (rng.random((len(probs), n)) < 0.5)
        A[:, n - len(probs) :] = 0
        g.adjacency = A.astype(np.float32)
        for nt, et in ((0.8, 0.98), (0.5, 0.7), (1.0, 1.0), (0.0, 0.0)):
            node_mask, edge_mask = _reference_prune(g, nt, et)
            r = prune(g, nt, et)
            # prune's clean-up pass then only removes: the masks before it must agree, so check containment and the
            # clean-up's own rule
            assert not (r.edge_mask & ~edge_mask).any() and not (r.node_mask & ~node_mask).any(), (trial, nt, et)
            cleaned = edge_mask & r.node_mask[:, None] & r.node_mask[None, :]
            assert np.array_equal(r.edge_mask, cleaned), (trial, nt, et)
