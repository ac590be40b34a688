"""Probe loss (Gao et al. 2024, §4.2, "Recovery of known features with 1d probes"; docs/concepts.md).

For each binary task, a 1-D logistic probe is fitted on every latent by Newton-Raphson, and the task's
score is the best (lowest) cross-entropy over latents:

    min over i, w, b of  E[ -y log sigmoid(w z_i + b) - (1 - y) log(1 - sigmoid(w z_i + b)) ]

where z_i is latent i's pre-activation (before TopK or the ReLU) and y the label. As in the paper, every
latent is a candidate (no preselection) and the loss is the fitted probe's loss on the tokens it was fitted
on. The probe loss of an SAE is the mean over tasks. Each task is balanced (as many positives as
negatives, drawn with a fixed seed), so a probe that has learnt nothing scores ln 2 on every task and the
mean over tasks compares like with like.

The fits run for a block of latents at once: one Newton step is a handful of [tokens, latents] tensor
operations and the 2 x 2 solve of each latent in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .labels import NO_LABEL, POS_TASKS, TokenLabeller

if TYPE_CHECKING:
    from ..sae.base import DictionarySAE

MIN_PER_CLASS = 32  # a task with fewer positives (or negatives) than this is left out
NEWTON_STEPS = 12
MAX_STEP = 4.0  # on standardised latents; keeps a step from overshooting where the data are (nearly) separable
BLOCK_ELEMENTS = 2**23  # [tokens, latents] elements per block of latents (32 MB of float32)


def probe_losses(z: torch.Tensor, y: torch.Tensor, steps: int = NEWTON_STEPS) -> torch.Tensor:
    """The cross-entropy (nats) of the best 1-D logistic probe y ~ sigmoid(w z_i + b) of each column i of
    `z` [tokens, latents], fitted by Newton-Raphson; `y` [tokens] holds 0/1 labels. The loss kept for a
    column is the lowest of its iterates (each is a probe, so the minimum is an attained loss)."""
    z = z.float()
    y = y.to(z).unsqueeze(1)
    mean, std = z.mean(0), z.std(0)
    zs = (z - mean) / torch.where(std > 1e-8, std, 1.0)  # standardised: a constant (dead) latent stays 0
    prior = float(y.mean())
    w = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    b = torch.full_like(w, math.log(prior / (1 - prior)) if 0 < prior < 1 else 0.0)
    best = torch.full_like(w, math.inf)
    for step in range(steps + 1):
        s = zs * w + b
        best = torch.minimum(best, (torch.nn.functional.softplus(s) - y * s).mean(0))
        if step == steps:
            break
        p = torch.sigmoid(s)
        r, h = p - y, p * (1 - p)
        gw, gb = (r * zs).mean(0), r.mean(0)
        hww, hwb, hbb = (h * zs * zs).mean(0) + 1e-9, (h * zs).mean(0), h.mean(0) + 1e-9
        det = (hww * hbb - hwb * hwb).clamp_min(1e-12)
        dw, db = (hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det
        scale = (MAX_STEP / torch.maximum(dw.abs(), db.abs()).clamp_min(1e-12)).clamp(max=1.0)
        w, b = w - scale * dw, b - scale * db
    return best


@dataclass
class ProbeTask:
    name: str  # e.g. "pos: noun", "source: Moby-Dick"
    per_class: int  # positives used (= negatives used)
    loss: float  # the best single-latent probe's cross-entropy (nats; ln 2 = 0.693 is chance)
    latent: int  # the latent of that probe


@dataclass
class ProbeReport:
    loss: float  # mean of the tasks' losses
    tasks: list[ProbeTask]


class ProbeCollector:
    """Collects the hook activations of labelled held-out tokens during evaluation; `fit` scores an SAE."""

    def __init__(self, labeller: TokenLabeller, per_class: int, seed: int = 0):
        self.labeller, self.per_class, self.seed = labeller, per_class, seed
        self.x: list[torch.Tensor] = []
        self.pos: list[np.ndarray] = []
        self.source: list[np.ndarray] = []

    def add(self, doc_index: np.ndarray, doc_offset: np.ndarray, x: torch.Tensor) -> None:
        """x [tokens, d]: the activations of the tokens whose provenance is doc_index / doc_offset (flat)."""
        labels = self.labeller.label(doc_index.reshape(-1), doc_offset.reshape(-1))
        keep = np.flatnonzero((labels.pos != NO_LABEL) | (labels.source != NO_LABEL))
        if len(keep):
            self.x.append(x[torch.from_numpy(keep).to(x.device)].float().cpu())
            self.pos.append(labels.pos[keep])
            self.source.append(labels.source[keep])

    def tasks(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, positive rows, negative rows) of each task with at least MIN_PER_CLASS of both, balanced."""
        if not self.x:
            return []
        pos, source = np.concatenate(self.pos), np.concatenate(self.source)
        tagged = pos != NO_LABEL
        candidates = [(f"pos: {name}", pos == i, tagged & (pos != i)) for i, name in enumerate(POS_TASKS)]
        if len(self.labeller.sources) > 1:  # one source alone is no task
            labelled = source != NO_LABEL
            candidates += [(f"source: {s}", source == i, labelled & (source != i)) for i, s in enumerate(self.labeller.sources)]
        rng = np.random.default_rng(self.seed)
        out = []
        for name, positive, negative in candidates:
            n = min(int(positive.sum()), int(negative.sum()), self.per_class)
            if n >= MIN_PER_CLASS:
                draw = [rng.choice(np.flatnonzero(rows), n, replace=False) for rows in (positive, negative)]
                out.append((name, draw[0], draw[1]))
        return out

    @torch.no_grad()
    def fit(self, sae: DictionarySAE, candidates: int = 0) -> ProbeReport | None:
        """Every task's best single-latent probe; None when no task has data. `candidates` > 0 fits only that
        many latents per task, those of the highest score statistic (see `_candidates`); 0 fits every latent."""
        tasks = self.tasks()
        if not tasks:
            return None
        x = torch.cat(self.x)
        rows, inverse = np.unique(np.concatenate([np.concatenate([p, n]) for _, p, n in tasks]), return_inverse=True)
        device = sae.W_enc.device
        centred = x[torch.from_numpy(rows)].to(device) - sae.b_pre.float()
        index, start = [], 0
        for _, p, _n in tasks:  # each task's rows within `centred`: its positives, then its negatives
            index.append(torch.from_numpy(inverse[start : start + 2 * len(p)]).to(device))
            start += 2 * len(p)
        labels = [torch.cat([torch.ones(len(p)), torch.zeros(len(n))]).to(device) for _, p, n in tasks]

        def pre_activations(latents: slice | torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
            # W_enc (x - b_pre) + b_enc: the input of TopK or of the ReLU, for both architectures
            return centred[rows] @ sae.W_enc[latents].float().T + sae.b_enc[latents].float()

        n_latents, block = sae.cfg.n_latents, max(1, BLOCK_ELEMENTS // len(centred))
        best = []
        if 0 < candidates < n_latents:
            picked = self._candidates(pre_activations, index, labels, n_latents, block, candidates)
            for idx, y, cand in zip(index, labels, picked):
                loss, i = probe_losses(pre_activations(cand, idx), y).min(0)
                best.append((float(loss), int(cand[i])))
        else:
            best = [(math.inf, -1)] * len(tasks)
            for lo in range(0, n_latents, block):
                z = pre_activations(slice(lo, lo + block))
                for t, (idx, y) in enumerate(zip(index, labels)):
                    loss, i = probe_losses(z[idx], y).min(0)
                    if float(loss) < best[t][0]:
                        best[t] = (float(loss), lo + int(i))
        report = [ProbeTask(name, len(p), loss, latent) for (name, p, _), (loss, latent) in zip(tasks, best)]
        return ProbeReport(float(np.mean([t.loss for t in report])), report)

    @staticmethod
    def _candidates(
        pre_activations: Callable[[slice | torch.Tensor], torch.Tensor],
        index: list[torch.Tensor],
        labels: list[torch.Tensor],
        n_latents: int,
        block: int,
        keep: int,
    ) -> list[torch.Tensor]:
        """Per task, the `keep` latents of the largest score statistic cov(z, y)^2 / var(z): the loss decrease
        a first Newton step from the constant probe predicts (to second order), so the latents the full fit
        would rank first."""
        top: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0, dtype=torch.long))] * len(index)
        for lo in range(0, n_latents, block):
            z = pre_activations(slice(lo, lo + block))
            for t, (idx, y) in enumerate(zip(index, labels)):
                zt = z[idx]
                zt = zt - zt.mean(0)
                score = ((y - y.mean()) @ zt).square() / zt.square().sum(0).clamp_min(1e-12)
                values = torch.cat([top[t][0].to(score), score])
                latents = torch.cat([top[t][1].to(score.device), torch.arange(lo, lo + len(score), device=score.device)])
                kept = values.topk(min(keep, len(values))).indices
                top[t] = (values[kept], latents[kept])
        return [latents for _, latents in top]
