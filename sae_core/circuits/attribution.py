"""Nodes and edges of a prompt's attribution graph (Ameisen et al. 2025; circuit-tracer's attribute()).

Targets are the active features' pre-activations (W_enc[f] . mlp_in at their layer and position) and the chosen
logits, demeaned over the vocabulary as circuit-tracer does (the logit minus the mean logit). For a batch of targets
the frozen forward runs on zero writes that require gradients (the frozen model is affine in its writes, so the
derivative does not depend on where it is taken), stopping at the deepest target's layer, and one backward pass gives
every target's derivative with respect to every write. An edge is then a dot product: a feature source's activation
times its decoder row . the derivative at its layer and position; an error node's vector . the derivative; a token's
embedding . the derivative at layer 0's input.
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
    batch_size: int = 64  # targets per backward pass
    time_limit_s: float | None = None  # refuse to go on past this many seconds

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise SaescopeError(f"max_prompt_tokens must be at least 1 (got {self.max_prompt_tokens})")
        if self.max_n_logits < 1:
            raise SaescopeError(f"max_n_logits must be at least 1 (got {self.max_n_logits})")
        if not 0 < self.desired_logit_prob <= 1:
            raise SaescopeError(f"desired_logit_prob must be in (0, 1] (got {self.desired_logit_prob})")
        if self.batch_size < 1:
            raise SaescopeError(f"batch_size must be at least 1 (got {self.batch_size})")
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


def _pad(g: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """A derivative over the first P positions [B, P, d] as one over all T (zeros after P); None stays None."""
    if g is None or g.shape[1] == T:
        return g
    return torch.cat([g, g.new_zeros(g.shape[0], T - g.shape[1], g.shape[2])], 1)


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
    rm = ReplacementModel(model, transcoders, ids)
    T, n_layers = rm.n_pos, rm.n_layers
    dtype, device = rm.embed.dtype, rm.embed.device
    d = rm.embed.shape[-1]

    # nodes: active features (activation > 0), layer-major then position
    feats, acts, dec_rows, enc_rows = [], [], [], []
    for L, s in enumerate(rm.states):
        pos, slot = (s.values > 0).nonzero(as_tuple=True)
        idx = s.indices[pos, slot]
        feats.append(torch.stack([torch.full_like(pos, L), pos, idx], 1))
        acts.append(s.values[pos, slot])
        dec_rows.append(rm.transcoders[L].W_dec.detach()[idx].to(dtype))
        enc_rows.append(rm.transcoders[L].W_enc.detach()[idx].to(dtype))
    feature_table = torch.cat(feats) if feats else torch.zeros(0, 3, dtype=torch.long)
    activations = torch.cat(acts)
    n_feat = len(feature_table)
    layer_start = np.cumsum([0] + [len(f) for f in feats])

    logit_tokens, logit_probs = select_logits(rm.logits[-1], cfg.max_n_logits, cfg.desired_logit_prob)
    W_U = rm.unembed.weight.detach().to(dtype)
    logit_dirs = W_U[logit_tokens] - W_U.mean(0, keepdim=True)  # demeaned logit directions [n_logits, d]
    n_logits = len(logit_tokens)
    n_nodes = n_feat + n_layers * T + T + n_logits
    err_start, emb_start, logit_start = n_feat, n_feat + n_layers * T, n_feat + n_layers * T + T
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=torch.float32)

    # targets: (row, layer or None for a logit, position, encoder/logit direction)
    enc_table = torch.cat(enc_rows)  # [n_feat, d]
    targets: list[tuple[int, int | None, int, torch.Tensor]] = []
    for i in range(n_feat):
        targets.append((i, int(feature_table[i, 0]), int(feature_table[i, 1]), enc_table[i]))
    for j in range(n_logits):
        targets.append((logit_start + j, None, T - 1, logit_dirs[j]))
    errors = torch.stack([s.error for s in rm.states])  # [n_layers, T, d]
    total = len(targets)
    done = 0
    for b0 in range(0, total, cfg.batch_size):
        if cfg.time_limit_s is not None and time.monotonic() - start > cfg.time_limit_s:
            raise GraphTimeLimit(
                f"the graph build ran past its time limit of {cfg.time_limit_s:g} s after {done} of {total} targets; "
                f"use a shorter prompt or a longer limit"
            )
        batch = targets[b0 : b0 + cfg.batch_size]
        B = len(batch)
        layers_needed = [t[1] for t in batch]
        stop = None if any(L is None for L in layers_needed) else max(L for L in layers_needed if L is not None)
        n_run = n_layers if stop is None else stop + 1
        P = max(t[2] for t in batch) + 1  # causal: the batch's targets read only positions before P
        embed = torch.zeros(B, P, d, dtype=dtype, device=device, requires_grad=True)
        writes = [torch.zeros(B, P, d, dtype=dtype, device=device, requires_grad=True) for _ in range(n_run)]
        with torch.enable_grad():
            mlp_ins, final = rm.frozen_forward(embed, writes, stop)
            out = torch.zeros((), dtype=dtype, device=device)
            for b, (_, tl, tp, direction) in enumerate(batch):
                if tl is None:
                    assert final is not None
                    vec = final[b, tp]
                else:
                    vec = mlp_ins[tl][b, tp]
                out = out + vec @ direction
            grads = torch.autograd.grad(out, [embed, *writes], allow_unused=True)
        g_embed, g_writes = _pad(grads[0], T), [_pad(g, T) for g in grads[1:]]
        target_rows = torch.tensor([t[0] for t in batch])
        block = torch.zeros(B, n_nodes, dtype=dtype)
        if g_embed is not None:
            block[:, emb_start:logit_start] = (g_embed * rm.embed[None]).sum(-1).cpu()
        for L in range(n_run):
            g = g_writes[L]  # [B, T, d]
            if g is None:  # no target of the batch reads this layer's writes
                continue
            block[:, err_start + L * T : err_start + (L + 1) * T] = (g * errors[L][None]).sum(-1).cpu()
            lo, hi = int(layer_start[L]), int(layer_start[L + 1])
            if hi > lo:
                pos = feature_table[lo:hi, 1].to(device)
                block[:, lo:hi] = ((g[:, pos, :] * dec_rows[L][None]).sum(-1) * activations[lo:hi][None]).cpu()
        adjacency[target_rows] = block.float()
        done += B
        if progress is not None:
            progress(done, total)

    graph = AttributionGraph(
        input_ids=ids.tolist(),
        n_layers=n_layers,
        features=feature_table.cpu().numpy().astype(np.int64),
        activations=activations.detach().cpu().double().numpy(),
        logit_tokens=logit_tokens,
        logit_probabilities=logit_probs,
        adjacency=adjacency.numpy(),
        meta={"seconds": time.monotonic() - start, "targets": total},
    )
    return graph, rm
