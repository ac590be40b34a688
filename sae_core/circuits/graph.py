"""An attribution graph as plain data: node tables and a dense adjacency matrix, JSON-serialisable.

Node order (circuit-tracer's): active features, then error nodes (layer-major, n_layers x n_pos), then token
embeddings (n_pos), then logits. adjacency[target, source] is the edge weight: the source's activation times the
derivative of the target's pre-activation along the frozen linear paths. Rows of error and embedding nodes are zero
(they have no inputs in the replacement model).

Feature nodes are the active features the build visited: all of them, or under AttributionConfig.max_feature_nodes the
most influential ones; edges from the others are not in the matrix. meta then says how many were active
("active_features"), the cap ("max_feature_nodes"), and what the dropped ones carried ("dropped_edge_share": of the
kept targets' incoming edge magnitude; "dropped_influence_share": of the features' estimated influence on the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class AttributionGraph:
    input_ids: list[int]
    n_layers: int
    features: np.ndarray  # [n_features, 3] int64: layer, position, latent index
    activations: np.ndarray  # [n_features] float: the features' activations
    logit_tokens: list[int]  # the chosen output tokens (at the last position)
    logit_probabilities: list[float]  # their probabilities
    adjacency: np.ndarray  # [n_nodes, n_nodes] float32: adjacency[target, source]
    input_tokens: list[str] = field(default_factory=list)  # the prompt's tokens as text, when a tokenizer was given
    meta: dict[str, Any] = field(default_factory=dict)  # the model, the transcoder set, timings

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def error_node(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def embed_node(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_node(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i

    def feature_node(self, layer: int, pos: int, index: int) -> int | None:
        hit = np.nonzero((self.features[:, 0] == layer) & (self.features[:, 1] == pos) & (self.features[:, 2] == index))[0]
        return int(hit[0]) if len(hit) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "input_ids": list(self.input_ids),
            "input_tokens": list(self.input_tokens),
            "n_layers": self.n_layers,
            "features": self.features.tolist(),
            "activations": self.activations.tolist(),
            "logit_tokens": list(self.logit_tokens),
            "logit_probabilities": list(self.logit_probabilities),
            "adjacency": self.adjacency.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AttributionGraph:
        return cls(
            input_ids=list(d["input_ids"]),
            n_layers=int(d["n_layers"]),
            features=np.asarray(d["features"], dtype=np.int64).reshape(-1, 3),
            activations=np.asarray(d["activations"], dtype=np.float64),
            logit_tokens=list(d["logit_tokens"]),
            logit_probabilities=[float(p) for p in d["logit_probabilities"]],
            adjacency=np.asarray(d["adjacency"], dtype=np.float32),
            input_tokens=list(d.get("input_tokens", [])),
            meta=dict(d.get("meta", {})),
        )
