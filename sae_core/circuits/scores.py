"""Replacement and completeness scores of an attribution graph ("Circuit Tracing", Ameisen et al. 2025, §5.4;
circuit-tracer's compute_graph_scores).

replacement score: of the influence on the chosen logits that starts at the graph's sources (token embeddings and
error nodes), the share starting at tokens: 1 when every path from the logits back ends at a token, through features.
completeness score: the share of each node's incoming (normalised) edge weight that does not come from error nodes,
averaged over the nodes weighted by their influence on the logits (the logits weighted by their probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import AttributionGraph
from .prune import influence, logit_weights, normalize_rows


@dataclass
class GraphScores:
    replacement: float
    completeness: float


def graph_scores(graph: AttributionGraph) -> GraphScores:
    w = logit_weights(graph)
    normalized = normalize_rows(graph.adjacency)
    node_inf = influence(normalized, w)
    err_lo, err_hi = graph.n_features, graph.n_features + graph.n_errors
    tok_hi = err_hi + graph.n_pos
    token_inf = node_inf[err_hi:tok_hi].sum()
    error_inf = node_inf[err_lo:err_hi].sum()
    replacement = float(token_inf / (token_inf + error_inf)) if token_inf + error_inf > 0 else 0.0
    non_error = 1 - normalized[:, err_lo:err_hi].sum(axis=1)
    output_inf = node_inf + w
    completeness = float((non_error * output_inf).sum() / output_inf.sum())
    return GraphScores(replacement, completeness)
