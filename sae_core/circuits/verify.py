"""Check an attribution graph by intervention in the real model (issue 29 items 3 and 4).

Edges: the `n_edges` strongest kept edges (by |weight|) whose source is a feature node. For each, the source feature
is ablated in the REAL model: its layer's MLP output minus activation x W_dec[f] at its position, every other MLP
running as it is (nothing frozen). The target's change is read from the same forward: a feature target's
pre-activation W_enc[g] . mlp_in at its layer and position (b_enc cancels in the difference), a logit target's
demeaned logit (the logit minus the mean logit, as attribution.py defines its targets). The graph predicts
-weight: an edge is the source's activation times the target's derivative along the frozen linear paths, so removing
the source removes the edge. An edge MATCHES when the measured and predicted changes have the same sign and are within
a factor of `factor` (3) of each other: max(|p|, |m|) <= factor * min(|p|, |m|). All ablated sources run as the rows of
one batched forward (chunks of `BATCH` rows), with an unablated row to difference against.

Strongest node (item 4): the kept feature node with the most influence on the logits is ablated the same way and the
top logit's (demeaned) change is measured. The graph's prediction is the sum over its paths: through the frozen
linear model with the other active features answering linearly to their pre-activations (the TopK set and the error
nodes held fixed), computed exactly by frozen forwards of the replacement model, layer by layer. `predicted_direct`
is the same with every other feature held fixed too (writes constant: the direct edge's -weight, the frozen model's
own answer). The node matches by the same rule against `predicted` (`match`) and against `predicted_direct`
(`match_direct`); bench/RESULTS.md compares the two on the bundled model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SaescopeError
from ..model import LanguageModel, Site
from ..sae.transcoder import mlp_in_hook, mlp_out_hook
from .graph import AttributionGraph
from .prune import Pruned
from .replacement import ReplacementModel

FACTOR = 3.0  # a match: same sign and within this factor
BATCH = 32  # ablated rows per real forward
RULE = "same sign and within a factor of 3"


@dataclass
class EdgeCheck:
    source: int  # graph node indices (AttributionGraph's node order)
    target: int
    weight: float  # the edge's weight in the graph
    predicted: float  # the graph's prediction for the target's change when the source is ablated: -weight
    measured: float  # the target's change in the real model
    match: bool


@dataclass
class NodeCheck:
    node: int  # the ablated feature node (graph index)
    layer: int
    pos: int
    feature: int
    logit_token: int  # the top logit's token id
    predicted: float  # the graph's sum over paths (features answering linearly)
    predicted_direct: float  # the direct edge only (every other write held)
    measured: float  # the real model's change of the demeaned top logit
    match: bool  # measured against predicted
    match_direct: bool  # measured against predicted_direct


@dataclass
class Verification:
    edges: list[EdgeCheck]
    strongest: NodeCheck | None
    factor: float = FACTOR
    rule: str = RULE

    @property
    def checked(self) -> int:
        return len(self.edges)

    @property
    def matched(self) -> int:
        return sum(e.match for e in self.edges)

    @property
    def share(self) -> float | None:
        return self.matched / self.checked if self.edges else None

    def to_json(self, kept: np.ndarray | None = None) -> dict[str, Any]:
        """Plain JSON; with `kept` (the pruned graph's kept node indices, sorted), node indices become the stored
        graph's node ids (trace.stored_graph numbers the kept nodes 0..n-1 in graph order)."""

        def node_id(i: int) -> int:
            return int(np.searchsorted(kept, i)) if kept is not None else i

        edges = [{**asdict(e), "source": node_id(e.source), "target": node_id(e.target)} for e in self.edges]
        strongest = None if self.strongest is None else {**asdict(self.strongest), "node": node_id(self.strongest.node)}
        return {
            "checked": self.checked,
            "matched": self.matched,
            "share": self.share,
            "factor": self.factor,
            "rule": self.rule,
            "edges": edges,
            "strongest": strongest,
        }


def matches(predicted: float, measured: float, factor: float = FACTOR) -> bool:
    """Same sign and within `factor` of each other (two zeros match; a zero and a non-zero do not)."""
    if predicted == 0 or measured == 0:
        return predicted == measured
    if (predicted > 0) != (measured > 0):
        return False
    small, big = sorted((abs(predicted), abs(measured)))
    return big <= factor * small


def strongest_edges(graph: AttributionGraph, pruned: Pruned, n: int) -> list[tuple[int, int]]:
    """The n kept edges with a feature source of the largest |weight|: (target, source) node indices."""
    mask = pruned.edge_mask.copy()
    mask[:, graph.n_features :] = False
    targets, sources = np.nonzero(mask)
    if not len(targets):
        return []
    order = np.argsort(-np.abs(graph.adjacency[targets, sources]), kind="stable")[:n]
    return [(int(targets[i]), int(sources[i])) for i in order]


class _Readout:
    """Real forwards of the prompt, each row with some feature ablations, reading the MLP inputs of chosen layers and
    the last position's logits."""

    def __init__(self, lm: LanguageModel, transcoders: dict[int, Any], graph: AttributionGraph) -> None:
        self.lm, self.transcoders, self.graph = lm, transcoders, graph
        self.ids = torch.tensor(graph.input_ids, dtype=torch.long, device=lm.device)
        self.dtype = lm.model.get_output_embeddings().weight.dtype

    def decoder_write(self, node: int) -> tuple[int, int, torch.Tensor]:
        layer, pos, index = (int(v) for v in self.graph.features[node])
        row = self.transcoders[layer].W_dec.detach()[index].to(self.lm.device, self.dtype)
        return layer, pos, float(self.graph.activations[node]) * row

    @torch.no_grad()
    def run(self, ablate: list[list[int]], read_layers: set[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One forward with a row per entry of `ablate` (the feature nodes removed in that row). Returns
        {layer: MLP input [B, T, d]} and the last position's logits [B, V], both float64."""
        B, T = len(ablate), len(self.graph.input_ids)
        d = self.lm.d_model
        deltas: dict[int, torch.Tensor] = {}
        for b, nodes in enumerate(ablate):
            for node in nodes:
                layer, pos, vec = self.decoder_write(node)
                deltas.setdefault(layer, torch.zeros(B, T, d, dtype=self.dtype, device=self.lm.device))[b, pos] += vec
        seen: dict[int, torch.Tensor] = {}

        def remove(delta: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            return lambda _x, y: y - delta

        def keep(layer: int) -> Callable[[torch.Tensor], None]:
            return lambda a: seen.__setitem__(layer, a.double())

        with contextlib.ExitStack() as stack:
            for layer, delta in deltas.items():
                stack.enter_context(self.lm.edit(Site.of(mlp_in_hook(layer), mlp_out_hook(layer)), remove(delta)))
            for layer in read_layers:
                stack.enter_context(self.lm.watch(mlp_in_hook(layer), keep(layer)))
            # the last position's logits only: [B, T, V] would be ~260 MB at 21 rows of 64 tokens
            logits = self.lm.model(self.ids[None].expand(B, T), use_cache=False, logits_to_keep=1).logits[:, -1].double()
        return seen, logits

    def target_values(self, target: int, mlp_ins: dict[int, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """The target's value in every row [B]: a feature's pre-activation (without b_enc) or a demeaned logit."""
        g = self.graph
        if target < g.n_features:
            layer, pos, index = (int(v) for v in g.features[target])
            enc = self.transcoders[layer].W_enc.detach()[index].to(mlp_ins[layer].device, torch.float64)
            return mlp_ins[layer][:, pos] @ enc
        i = target - g.logit_node(0)
        if not 0 <= i < g.n_logits:
            raise SaescopeError(f"node {target} has no incoming edges to check (not a feature or a logit)")
        return logits[:, g.logit_tokens[i]] - logits.mean(-1)


def verify_edges(
    lm: LanguageModel, transcoders: dict[int, Any], graph: AttributionGraph, pruned: Pruned, n_edges: int = 20, factor: float = FACTOR
) -> list[EdgeCheck]:
    """Ablate the sources of the n strongest kept feature-source edges in the real model; compare each target's change
    with -weight."""
    pairs = strongest_edges(graph, pruned, n_edges)
    if not pairs:
        return []
    reader = _Readout(lm, transcoders, graph)
    sources = sorted({s for _, s in pairs})
    layers = {int(graph.features[t, 0]) for t, _ in pairs if t < graph.n_features}
    measured: dict[tuple[int, int], float] = {}
    for c0 in range(0, len(sources), BATCH):
        chunk = sources[c0 : c0 + BATCH]
        mlp_ins, logits = reader.run([[]] + [[s] for s in chunk], layers)  # row 0 unablated
        row = {s: 1 + i for i, s in enumerate(chunk)}
        for t, s in pairs:
            if s in row:
                values = reader.target_values(t, mlp_ins, logits)
                measured[t, s] = float(values[row[s]] - values[0])
    out = []
    for t, s in pairs:
        weight = float(graph.adjacency[t, s])
        out.append(EdgeCheck(s, t, weight, -weight, measured[t, s], matches(-weight, measured[t, s], factor)))
    return out


@torch.no_grad()
def frozen_ablation(rm: ReplacementModel, graph: AttributionGraph, node: int, direction: torch.Tensor, respond: bool) -> float:
    """The change of the final normalised residual's last position along `direction` [d] when feature `node` is removed
    from the replacement model's writes: the frozen model is linear in its writes, so this is a frozen forward of the
    change alone. With `respond`, every later active feature answers its pre-activation's change linearly (its TopK
    slot kept), layer by layer: the graph's sum over paths; without, only the direct paths."""
    layer, pos, index = (int(v) for v in graph.features[node])
    dtype = rm.embed.dtype
    T, d = rm.n_pos, rm.embed.shape[-1]
    zero = torch.zeros(1, T, d, dtype=dtype, device=rm.embed.device)
    writes = [zero.clone() for _ in range(rm.n_layers)]
    writes[layer][0, pos] -= float(graph.activations[node]) * rm.transcoders[layer].W_dec.detach()[index].to(dtype)
    if respond:
        for L in range(layer + 1, rm.n_layers):
            mlp_ins, _ = rm.frozen_forward(zero, writes, stop_layer=L)
            s, tc = rm.states[L], rm.transcoders[L]
            active = (s.values > 0).to(dtype)  # [T, k]
            d_pre = torch.einsum("tkd,td->tk", tc.W_enc.detach()[s.indices].to(dtype), mlp_ins[L][0]) * active
            writes[L][0] += torch.einsum("tk,tkd->td", d_pre, tc.W_dec.detach()[s.indices].to(dtype))
    _, final = rm.frozen_forward(zero, writes)
    assert final is not None
    return float(final[0, -1] @ direction.to(dtype))


def ablate_strongest(
    lm: LanguageModel, rm: ReplacementModel, graph: AttributionGraph, pruned: Pruned, factor: float = FACTOR
) -> NodeCheck | None:
    """Ablate the kept feature node with the most influence; the top logit's change, measured and predicted."""
    F = graph.n_features
    kept = np.nonzero(pruned.node_mask[:F])[0]
    if not len(kept):
        return None
    node = int(kept[np.argmax(pruned.node_influence[kept])])
    W_U = rm.unembed.weight.detach()
    token = graph.logit_tokens[0]
    direction = (W_U[token] - W_U.mean(0)).double()
    predicted = frozen_ablation(rm, graph, node, direction, respond=True)
    direct = frozen_ablation(rm, graph, node, direction, respond=False)
    reader = _Readout(lm, rm.transcoders, graph)
    mlp_ins, logits = reader.run([[], [node]], set())
    values = reader.target_values(graph.logit_node(0), mlp_ins, logits)
    measured = float(values[1] - values[0])
    layer, pos, index = (int(v) for v in graph.features[node])
    return NodeCheck(
        node, layer, pos, index, token, predicted, direct, measured, matches(predicted, measured, factor), matches(direct, measured, factor)
    )


def verify(
    lm: LanguageModel, rm: ReplacementModel, graph: AttributionGraph, pruned: Pruned, n_edges: int = 20, factor: float = FACTOR
) -> Verification:
    """Both checks of a pruned graph: its strongest feature-source edges and its strongest feature node."""
    if n_edges < 1:
        raise SaescopeError(f"the number of edges to verify must be at least 1 (got {n_edges})")
    if factor < 1:
        raise SaescopeError(f"the match factor must be at least 1 (got {factor})")
    edges = verify_edges(lm, rm.transcoders, graph, pruned, n_edges, factor)
    rule = RULE if factor == FACTOR else f"same sign and within a factor of {factor:g}"
    return Verification(edges, ablate_strongest(lm, rm, graph, pruned, factor), factor, rule)
