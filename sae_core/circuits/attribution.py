"""Nodes and edges of a prompt's attribution graph (Ameisen et al. 2025; circuit-tracer's attribute()).

Targets are the active features' pre-activations (W_enc[f] . mlp_in at their layer and position) and the chosen
logits, demeaned over the vocabulary as circuit-tracer does (the logit minus the mean logit). The frozen model is
linear in its writes, so a batch of targets needs no forward pass: ReplacementModel.transposed_pass carries their
directions down through the transposed frozen layers, and at each layer an edge is a dot product: a feature source's
activation times its decoder row . the derivative at its layer and position; an error node's vector . the derivative;
a token's embedding . the derivative at layer 0's input. Batches hold targets of neighbouring layers and positions
(sorted by layer, then position), so each stops near its own layer and reads only the positions it needs.

Which features become nodes (circuit-tracer's scheme, our code): phase 1 computes the logits' rows; phase 2 repeatedly
estimates every active feature's influence on the logits from the rows computed so far (the influence series over the
partial matrix) and computes the rows of the most influential features not yet visited, `update_interval` batches at a
time, until `max_feature_nodes` are visited. Only visited features are feature nodes; the edges from the others into
visited nodes are dropped, as circuit-tracer drops them: not folded into error nodes, so the graph's replacement and
completeness scores are those of the kept graph and do not see them. meta["dropped_edge_share"] says how much of the
kept targets' incoming edge magnitude that was, and meta["dropped_influence_share"] the estimated share of the
features' influence on the logits held by the dropped features. With max_feature_nodes >= the active features (or
None) every feature is visited in layer order and the graph is the full one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SaescopeError
from ..sae.transcoder import TranscoderSAE
from .graph import AttributionGraph
from .replacement import ReplacementModel

Progress = Callable[[int, int], None]  # (targets done, targets in all)


@dataclass
class AttributionConfig:
    max_prompt_tokens: int = 64  # longer prompts are refused (Neuronpedia's cap)
    max_n_logits: int = 10  # at most this many output logits as targets
    desired_logit_prob: float = 0.95  # ... fewer once their probabilities add up to this
    batch_size: int = 128  # targets per transposed pass (128 was ~20% faster than 64 on 2 cores)
    time_limit_s: float | None = None  # refuse to go on past this many seconds
    # feature nodes chosen by influence (None: every active feature). 1024 keeps a 16-token graph on the bundled model
    # (15,360 active features) to ~1,000 transposed passes, seconds on 2 cores; circuit-tracer's users pick ~7,500 on GPUs
    max_feature_nodes: int | None = 1024
    update_interval: int = 2  # batches between two re-rankings of the features by influence (256 targets)
    # False: position 0's features and error vectors are no sources or targets (their writes stay in the frozen model,
    # unattributed, like biases), as circuit-tracer leaves out its BOS position. The first position is where models
    # park attention: its features have outsized activations that swamp the graph, and its residual depends on that
    # one token only. True: the complete graph (every edge checkable against the frozen model).
    attribute_position_0: bool = True

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise SaescopeError(f"max_prompt_tokens must be at least 1 (got {self.max_prompt_tokens})")
        if self.max_n_logits < 1:
            raise SaescopeError(f"max_n_logits must be at least 1 (got {self.max_n_logits})")
        if not 0 < self.desired_logit_prob <= 1:
            raise SaescopeError(f"desired_logit_prob must be in (0, 1] (got {self.desired_logit_prob})")
        if self.batch_size < 1:
            raise SaescopeError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 1:
            raise SaescopeError(f"max_feature_nodes must be at least 1 or None (got {self.max_feature_nodes})")
        if self.update_interval < 1:
            raise SaescopeError(f"update_interval must be at least 1 (got {self.update_interval})")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise SaescopeError(f"time_limit_s must be positive (got {self.time_limit_s})")


class GraphTimeLimit(SaescopeError):
    """A graph build ran past its time limit."""


def select_logits(logits: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> tuple[list[int], list[float]]:
    """The top output tokens by probability at one position [V], fewest whose probabilities add up to the share."""
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_i = probs.topk(min(max_n_logits, len(probs)))
    n = int((top_p.cumsum(0) < desired_logit_prob).sum().item()) + 1
    n = min(n, len(top_p))
    return top_i[:n].tolist(), top_p[:n].tolist()


def partial_influence(rows: torch.Tensor, row_nodes: torch.Tensor, logit_nodes: torch.Tensor, logit_probs: torch.Tensor) -> torch.Tensor:
    """Every node's influence on the logits [n_all] from the rows computed so far (rows [R, n_all], row r the incoming
    edges of node row_nodes[r]): w^T (A + A^2 + ...) over the row-normalised |A| whose other rows are zero, as
    prune.influence computes it on a whole graph. A is acyclic, so the series ends."""
    a = rows.abs()
    a /= a.sum(1, keepdim=True).clamp_min(1e-10)
    weights = torch.zeros(rows.shape[1], dtype=rows.dtype)
    weights[logit_nodes] = logit_probs.to(rows.dtype)
    total = torch.zeros_like(weights)
    for _ in range(10_000):
        weights = weights[row_nodes] @ a
        if not weights.any():
            return total
        total += weights
    raise SaescopeError("the graph's influence did not converge: its adjacency matrix has a cycle")


def attribute(
    model: Any,
    transcoders: dict[int, TranscoderSAE],
    input_ids: torch.Tensor | list[int],
    config: AttributionConfig | None = None,
    progress: Progress | None = None,
) -> AttributionGraph:
    """Build the unpruned attribution graph of a prompt."""
    return attribute_with_model(model, transcoders, input_ids, config, progress)[0]


def attribute_with_model(
    model: Any,
    transcoders: dict[int, TranscoderSAE],
    input_ids: torch.Tensor | list[int],
    config: AttributionConfig | None = None,
    progress: Progress | None = None,
) -> tuple[AttributionGraph, ReplacementModel]:
    """The unpruned attribution graph of a prompt, and the replacement model it was read from."""
    cfg = config or AttributionConfig()
    start = time.monotonic()
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() != 1 or len(ids) == 0:
        raise SaescopeError("a prompt is a non-empty sequence of token ids")
    if len(ids) > cfg.max_prompt_tokens:
        raise SaescopeError(f"the prompt has {len(ids)} tokens; attribution graphs take at most {cfg.max_prompt_tokens}")
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise SaescopeError(f"token ids must be in [0, {vocab})")
    ids = ids.to(model.get_output_embeddings().weight.device)
    with torch.no_grad():
        rm = ReplacementModel(model, transcoders, ids)
        builder = _Builder(rm, cfg, start, progress)
        graph = builder.run()
    graph.meta["seconds"] = time.monotonic() - start
    return graph, rm


class _Builder:
    """The rows of one graph: all nodes' columns while building (every active feature), the visited ones kept."""

    def __init__(self, rm: ReplacementModel, cfg: AttributionConfig, start: float, progress: Progress | None) -> None:
        self.rm, self.cfg, self.start, self.progress = rm, cfg, start, progress
        T, n_layers = rm.n_pos, rm.n_layers
        self.T = T
        dtype = rm.embed.dtype
        # nodes: active features (activation > 0), layer-major then position then slot
        feats, acts, enc_rows, self.flat_slots, self.scaled_dec = [], [], [], [], []
        for L, s in enumerate(rm.states):
            active = s.values > 0
            if not cfg.attribute_position_0:
                active[0] = False
            pos, slot = active.nonzero(as_tuple=True)
            idx = s.indices[pos, slot]
            feats.append(torch.stack([torch.full_like(pos, L), pos, idx], 1))
            acts.append(s.values[pos, slot])
            enc_rows.append(rm.transcoders[L].W_enc.detach()[idx].to(dtype))
            # decoder rows times activations by (position, slot) [T, k, d]; inactive slots are zero vectors
            self.scaled_dec.append(s.values[..., None] * rm.transcoders[L].W_dec.detach()[s.indices].to(dtype))
            self.flat_slots.append((pos * s.values.shape[1] + slot).cpu())
        self.features = torch.cat(feats).cpu()
        self.activations = torch.cat(acts)
        self.enc = torch.cat(enc_rows)
        self.n_feat = len(self.features)
        self.layer_start = np.cumsum([0] + [len(f) for f in feats])
        self.logit_tokens, self.logit_probs = select_logits(rm.logits[-1], cfg.max_n_logits, cfg.desired_logit_prob)
        W_U = rm.unembed.weight.detach().to(dtype)
        self.logit_dirs = W_U[self.logit_tokens] - W_U.mean(0, keepdim=True)  # demeaned logit directions [n_logits, d]
        self.n_logits = len(self.logit_tokens)
        self.err_start = self.n_feat
        self.emb_start = self.n_feat + n_layers * T
        self.logit_start = self.emb_start + T
        self.n_all = self.logit_start + self.n_logits
        self.errors = torch.stack([s.error for s in rm.states])  # [n_layers, T, d]
        if not cfg.attribute_position_0:
            self.errors[:, 0] = 0  # position 0's error nodes stay, with no edges: the node layout does not change
        cap = self.n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, self.n_feat)
        self.cap = cap
        self.rows = torch.zeros(self.n_logits + cap, self.n_all, dtype=torch.float32)
        self.row_nodes = torch.zeros(self.n_logits + cap, dtype=torch.long)
        self.n_rows = 0
        self.total = self.n_logits + cap

    def _compute(self, nodes: list[int]) -> None:
        """Rows of the target nodes (features or logits), in batches of neighbouring layers and positions."""
        cfg, rm = self.cfg, self.rm
        for b0 in range(0, len(nodes), cfg.batch_size):
            if cfg.time_limit_s is not None and time.monotonic() - self.start > cfg.time_limit_s:
                raise GraphTimeLimit(
                    f"the graph build ran past its time limit of {cfg.time_limit_s:g} s after {self.n_rows} of "
                    f"{self.total} targets; use a shorter prompt, fewer feature nodes or a longer limit"
                )
            batch = nodes[b0 : b0 + cfg.batch_size]
            layers: list[int | None] = []
            positions: list[int] = []
            dirs = []
            for n in batch:
                if n >= self.logit_start:
                    layers.append(None)
                    positions.append(self.T - 1)
                    dirs.append(self.logit_dirs[n - self.logit_start])
                else:
                    layers.append(int(self.features[n, 0]))
                    positions.append(int(self.features[n, 1]))
                    dirs.append(self.enc[n])
            block = torch.zeros(len(batch), self.n_all, dtype=rm.embed.dtype, device=rm.embed.device)

            def on_write(L: int, g: torch.Tensor, block: torch.Tensor = block) -> None:  # g [P, B, d]
                P = g.shape[0]
                e0 = self.err_start + L * self.T
                block[:, e0 : e0 + P] = torch.bmm(g, self.errors[L, :P, :, None])[..., 0].T
                lo, hi = int(self.layer_start[L]), int(self.layer_start[L + 1])
                if hi == lo:
                    return
                # features of this layer at positions < P are a prefix of the layer's (they are position-ordered)
                slots = self.flat_slots[L]
                n = int(torch.searchsorted(slots, P * self.scaled_dec[L].shape[1]))
                if n:
                    by_slot = torch.bmm(g, self.scaled_dec[L][:P].transpose(1, 2))  # [P, B, k]
                    by_slot = by_slot.transpose(0, 1).reshape(g.shape[1], -1)  # [B, P * k]
                    block[:, lo : lo + n] = by_slot[:, slots[:n].to(g.device)]

            g_embed = rm.transposed_pass(layers, positions, torch.stack(dirs), on_write)
            P = g_embed.shape[0]
            block[:, self.emb_start : self.emb_start + P] = torch.bmm(g_embed, rm.embed[:P, :, None])[..., 0].T
            r0 = self.n_rows
            self.rows[r0 : r0 + len(batch)] = block.float().cpu()
            self.row_nodes[r0 : r0 + len(batch)] = torch.tensor(batch)
            self.n_rows += len(batch)
            if self.progress is not None:
                self.progress(self.n_rows, self.total)

    def _sorted(self, feats: list[int]) -> list[int]:
        """Features by layer then position (node order is that already), so a batch stops near its own layer."""
        return sorted(feats)

    def run(self) -> AttributionGraph:
        cfg = self.cfg
        logit_nodes = torch.arange(self.logit_start, self.n_all)
        logit_probs = torch.tensor(self.logit_probs)
        self._compute(logit_nodes.tolist())  # phase 1: the logits' rows
        visited = torch.zeros(self.n_feat, dtype=torch.bool)
        if self.cap == self.n_feat:
            self._compute(list(range(self.n_feat)))  # every feature: no ranking needed
            visited[:] = True
        while int(visited.sum()) < self.cap:  # phase 2: the most influential features not yet visited
            inf = partial_influence(self.rows[: self.n_rows], self.row_nodes[: self.n_rows], logit_nodes, logit_probs)
            rank = torch.argsort(inf[: self.n_feat], descending=True, stable=True)
            room = min(cfg.update_interval * cfg.batch_size, self.cap - int(visited.sum()))
            pending = rank[~visited[rank]][:room]
            visited[pending] = True
            self._compute(self._sorted(pending.tolist()))
        return self._graph(visited, logit_nodes, logit_probs)

    def _graph(self, visited: torch.Tensor, logit_nodes: torch.Tensor, logit_probs: torch.Tensor) -> AttributionGraph:
        kept = visited.nonzero()[:, 0]
        n_kept = len(kept)
        meta: dict[str, Any] = {
            "targets": self.total,
            "active_features": self.n_feat,
            "max_feature_nodes": self.cfg.max_feature_nodes,
            "attribute_position_0": self.cfg.attribute_position_0,
        }
        rows, row_nodes = self.rows[: self.n_rows], self.row_nodes[: self.n_rows]
        if n_kept < self.n_feat:
            dropped = ~visited
            mags = rows[:, : self.n_feat].abs()
            meta["dropped_edge_share"] = float(mags[:, dropped].sum() / rows.abs().sum().clamp_min(1e-30))
            inf = partial_influence(rows, row_nodes, logit_nodes, logit_probs)[: self.n_feat]
            meta["dropped_influence_share"] = float(inf[dropped].sum() / inf.sum().clamp_min(1e-30))
            columns = torch.cat([kept, torch.arange(self.n_feat, self.n_all)])
            rows = rows[:, columns]
        else:
            meta["dropped_edge_share"] = 0.0
            meta["dropped_influence_share"] = 0.0
        del self.rows
        # node index in the graph of each row's node: features renumbered among the kept, the rest shifted
        new_index = torch.full((self.n_all,), -1, dtype=torch.long)
        new_index[kept] = torch.arange(n_kept)
        new_index[self.n_feat :] = torch.arange(self.n_feat, self.n_all) - (self.n_feat - n_kept)
        n_nodes = self.n_all - (self.n_feat - n_kept)
        adjacency = torch.zeros(n_nodes, n_nodes, dtype=torch.float32)
        adjacency[new_index[row_nodes]] = rows
        return AttributionGraph(
            input_ids=self.rm.input_ids.tolist(),
            n_layers=self.rm.n_layers,
            features=self.features[kept].numpy().astype(np.int64),
            activations=self.activations[kept.to(self.activations.device)].detach().cpu().double().numpy(),
            logit_tokens=self.logit_tokens,
            logit_probabilities=self.logit_probs,
            adjacency=adjacency.numpy(),
            meta=meta,
        )
