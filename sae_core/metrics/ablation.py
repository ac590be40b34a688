"""Ablation sparsity (Gao et al. 2024, §4.5, "Sparsity of ablation effects"; docs/concepts.md).

At a token position t of a held-out window, the SAE encodes the hook's output; each active latent i is
ablated in turn: the residual at t becomes h_t - z_i W_dec[i] (the SAE's reconstruction without latent i,
plus the reconstruction error, which stays in), and the layers after the hook run on. The logits at the T
positions t..t+T-1 are compared with the unablated forward's: per position the V logit differences less
their median (a constant shift of all logits changes no probability), concatenated into one vector v of
V * T numbers, whose sparsity is

    (||v||_1 / ||v||_2)^2 / (V * T)

the "effective number of vocabulary tokens affected" as a fraction: 1 / (V * T) when one logit moves, about
2 / pi for a dense Gaussian change, smaller is sparser. The SAE's ablation sparsity is the mean over all
ablations (every active latent at every sampled position). The paper uses T = 16.

The ablated forwards run in float32 whatever the model's dtype: in bfloat16 the ablated and the reference
forward round differently at every logit (a logit of 10 is held to 1/16), a dense noise as large as a small
latent's effect. On the demo SAE (SmolLM2 layer 8, the same 96 ablations) bfloat16 gave 0.53, float32 0.29.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..model import LanguageModel

if TYPE_CHECKING:
    from ..sae.base import DictionarySAE


def effect_sparsity(delta: torch.Tensor) -> torch.Tensor:
    """(L1 / L2)^2 / (V * T) of each ablation's logit changes `delta` [ablations, T, V], after taking off each
    position's median change; NaN where an ablation changed nothing."""
    delta = delta.float()
    flat = (delta - delta.median(-1, keepdim=True).values).flatten(1)
    l1, l2_sq = flat.abs().sum(1), flat.square().sum(1)
    return torch.where(l2_sq > 0, l1.square() / l2_sq.clamp_min(1e-30) / flat.shape[1], math.nan)


def float32_model(lm: LanguageModel) -> LanguageModel:
    """`lm` itself when it computes in float32, else a float32 copy of it (SmolLM2-135M: 0.5 GB)."""
    if lm.dtype == torch.float32:
        return lm
    # .to, not .float(): transformers refuses .float() on a model loaded from a GGUF file
    return replace(lm, model=copy.deepcopy(lm.model).to(torch.float32), dtype=torch.float32)  # type: ignore[arg-type]  # transformers types .to for its own overloads


@dataclass
class AblationReport:
    sparsity: float  # mean (L1/L2)^2 / (V T) over the ablations
    ablations: int
    positions: int
    horizon: int  # T


class AblationMeter:
    """Samples one position per window from the windows it is given (the evaluation's clean forwards) until
    it holds `positions`, and ablates every active latent there, `rows_per_pass` ablations per forward, in
    float32 (`float32_model`: pass a float32 model to share one copy between meters)."""

    def __init__(
        self,
        lm: LanguageModel,
        sae: DictionarySAE,
        layer: int,
        skip: int,
        positions: int,
        horizon: int,
        seed: int = 0,
        rows_per_pass: int = 16,
    ) -> None:
        self.lm, self.sae, self.layer, self.skip = float32_model(lm), sae, layer, skip
        self.positions, self.horizon, self.rows_per_pass = positions, horizon, rows_per_pass
        self.rng = np.random.default_rng(seed)
        self.values: list[torch.Tensor] = []
        self.done = 0

    @torch.inference_mode()
    def add(self, ids: torch.Tensor, h: torch.Tensor) -> None:
        """ids [windows, context]; h [windows, context, d]: the hook's output in the clean forward of ids."""
        last = ids.shape[1] - self.horizon  # the latest position whose T following logits are all in the window
        for b in range(len(ids)):
            if self.done >= self.positions or last < self.skip:
                return
            self._ablate(ids[b], h[b], int(self.rng.integers(self.skip, last + 1)))
            self.done += 1

    def _ablate(self, ids: torch.Tensor, h: torch.Tensor, t: int) -> None:
        x = h[t].float()
        z = self.sae.encode(x[None])[0]
        active = z.nonzero().squeeze(1)
        end = t + self.horizon  # later positions cannot change the logits of 0..end-1
        for chunk in active.split(self.rows_per_pass):
            hidden = h[:end].to(self.lm.dtype).unsqueeze(0).repeat(len(chunk) + 1, 1, 1)  # row 0 unablated: the reference
            hidden[1:, t] = (x - z[chunk, None] * self.sae.W_dec[chunk].float()).to(self.lm.dtype)
            with self.lm.start_after(self.layer, hidden):
                out = self.lm.model(input_ids=ids[:end].expand(len(hidden), -1), use_cache=False, logits_to_keep=self.horizon)
            logits = out.logits.float()
            self.values.append(effect_sparsity(logits[1:] - logits[:1]).cpu())

    def report(self) -> AblationReport | None:
        values = torch.cat(self.values) if self.values else torch.empty(0)
        values = values[~values.isnan()]
        if not len(values):
            return None
        return AblationReport(float(values.double().mean()), len(values), self.done, self.horizon)
