"""Pruning an attribution graph by influence on the chosen logits, as circuit-tracer prunes (our own code).

Influence: with |A| row-normalised (each target's incoming edge magnitudes summing to 1), a node's influence on the
logits is w^T ((I - A)^-1 - I), w the logits' probabilities on the logit nodes. The graph is acyclic (a target reads
only earlier layers), so A is nilpotent and the series w^T (A + A^2 + ...) ends after at most n_layers + 2 terms: it is
computed that way, each term one vector-matrix product, never an inverse.

Pruning: keep the nodes carrying `node_threshold` of the summed influence (tokens and logits always kept), recompute the
influence on the kept subgraph, score each edge by its normalised weight times its target's influence (logits counting
their own weight), keep the edges carrying `edge_threshold` of the summed score, then drop features and errors left
without outgoing edges (features also without incoming ones) until nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SaescopeError
from .graph import AttributionGraph


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """|matrix| in float64 with each row summing to 1 (rows of zeros stay zero); one new matrix, no temporaries (an
    uncapped 16-token graph's matrix is 15,866^2)."""
    a = np.absolute(matrix, dtype=np.float64)
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-10)
    return a


def influence(normalized: np.ndarray, weights: np.ndarray, max_terms: int = 10_000) -> np.ndarray:
    """w^T ((I - A)^-1 - I) for a nilpotent A, as the finite series w^T A + w^T A^2 + ..."""
    current = weights @ normalized
    total = current.copy()
    for _ in range(max_terms):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise SaescopeError("the graph's influence did not converge: its adjacency matrix has a cycle")


def logit_weights(graph: AttributionGraph) -> np.ndarray:
    w = np.zeros(graph.n_nodes)
    w[graph.n_nodes - graph.n_logits :] = graph.logit_probabilities
    return w


def find_threshold(scores: np.ndarray, share: float) -> float:
    """The smallest score among the top scores that together carry `share` of the sum (scores are >= 0). Only the
    positive ones are sorted (a graph's edge scores are mostly zero); a share the positive ones do not reach (1, up
    to rounding) gives the smallest score, 0 where there are zeros, as sorting them all would."""
    ordered = np.sort(scores[scores > 0])[::-1]
    total = ordered.sum()
    if total <= 0:
        return 0.0
    cumulative = np.cumsum(ordered) / total
    i = int(np.searchsorted(cumulative, share))
    if i >= len(ordered):
        return 0.0 if ordered.size < scores.size else float(ordered[-1])
    return float(ordered[i])


@dataclass
class Pruned:
    node_mask: np.ndarray  # [n_nodes] bool
    edge_mask: np.ndarray  # [n_nodes, n_nodes] bool (target, source)
    node_influence: np.ndarray  # [n_nodes]: each node's influence on the chosen logits in the full graph

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


def check_thresholds(node_threshold: float, edge_threshold: float) -> None:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise SaescopeError(f"{name} must be between 0 and 1 (got {value})")


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """The node and edge masks of the pruned graph (a pure function of the graph and the two shares)."""
    check_thresholds(node_threshold, edge_threshold)
    n_keep_always = graph.n_pos + graph.n_logits  # tokens and logits, the last nodes
    n_front = graph.n_nodes - n_keep_always  # features and errors
    w = logit_weights(graph)
    node_inf = influence(normalize_rows(graph.adjacency), w)
    node_mask = node_inf >= find_threshold(node_inf, node_threshold)
    node_mask[n_front:] = True

    # the kept subgraph, normalised, then scaled in place into the edge scores (one float64 matrix at a time)
    edge_scores = np.absolute(graph.adjacency, dtype=np.float64)
    edge_scores[~node_mask] = 0
    edge_scores[:, ~node_mask] = 0
    edge_scores /= np.maximum(edge_scores.sum(axis=1, keepdims=True), 1e-10)
    nonzero = edge_scores != 0  # the kept subgraph's edges (a kept edge of weight 0 is no edge)
    edge_scores *= (influence(edge_scores, w) + w)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
    del edge_scores
    edge_mask &= nonzero

    n_feat = graph.n_features
    while True:
        before = node_mask.copy()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask[:n_front] &= edge_mask[:, :n_front].any(axis=0)  # features and errors need an outgoing edge
        node_mask[:n_feat] &= edge_mask[:n_feat].any(axis=1)  # features need an incoming one
        if (node_mask == before).all():
            break
    return Pruned(node_mask, edge_mask, node_inf)


def pruned_graph(graph: AttributionGraph, result: Pruned) -> AttributionGraph:
    """The graph with the pruned nodes' and edges' weights set to zero (same node tables)."""
    adjacency = graph.adjacency * result.edge_mask
    return AttributionGraph(
        input_ids=graph.input_ids,
        n_layers=graph.n_layers,
        features=graph.features,
        activations=graph.activations,
        logit_tokens=graph.logit_tokens,
        logit_probabilities=graph.logit_probabilities,
        adjacency=adjacency.astype(np.float32),
        input_tokens=graph.input_tokens,
        meta=dict(graph.meta),
    )
