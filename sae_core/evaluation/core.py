"""Core metrics as SAEBench's core eval defines them (sae_bench/evals/core/main.py, 0.6.0), on top of
`saescope eval`'s own pass (sae_core/evaluate.py: FVU, L0, CE and KL with the SAE and zero-ablated).

`CoreMeter` rides on that pass as an observer and adds, per evaluated token: the L1 of the codes, the
input's and the reconstruction's L2 norms and their ratio (shrinkage), their cosine, and the sums of
x_hat.x_hat and x.x_hat for the relative reconstruction bias (Rajamanoharan et al. 2024, eq. 10: the
scale that best fits x_hat to x is its inverse, 1 = unbiased), and each latent's firing count (its
density: frac_alive, freq_over_1/10_percent and their normalised forms, the mean log10 frequency).
The encoder's and decoder's average max cosine to another row come from the weights.

One definition differs on purpose: SAEBench 0.6.0's `explained_variance` subtracts the squared mean
over dimensions of E[x_d^2] from E|x|^2 (not the variance about the mean); ours is 1 - FVU, the
variance about the mean (its `explained_variance_legacy`, a per-token ratio, is stored as well).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..corpus import Windows
from ..evaluate import EvalResult

if TYPE_CHECKING:
    from ..sae.base import DictionarySAE

NORM_FLOOR = 1e-4  # SAEBench: an input norm below this divides by 1 in the L2 ratio


class CoreMeter:
    """Per-token sums beside evaluate's (an `evaluate.Observer`)."""

    def __init__(self, n_latents: int):
        self.n = 0
        self.fired = torch.zeros(n_latents, dtype=torch.long)
        self.fired_windows = torch.zeros(n_latents, dtype=torch.long)  # windows (SAEBench's prompts) where it fired at all
        self.sums = dict.fromkeys(("l1", "l2_in", "l2_out", "l2_ratio", "cossim", "xhat_sq", "x_dot_xhat", "ev_legacy", "mse"), 0.0)

    def __call__(self, batch: Windows, skip: int, x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat, z = x.double(), x_hat.double(), z.double()
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        resid = (x - x_hat).pow(2).sum(-1)
        dot = (x * x_hat).sum(-1)
        s = self.sums
        s["l1"] += float(z.sum())  # the codes are non-negative for every architecture here
        s["l2_in"] += float(n_in.sum())
        s["l2_out"] += float(n_out.sum())
        s["l2_ratio"] += float((n_out / torch.where(n_in.abs() < NORM_FLOOR, 1.0, n_in)).sum())
        s["cossim"] += float((dot / (n_in * n_out).clamp_min(1e-12)).sum())
        s["xhat_sq"] += float(n_out.pow(2).sum())
        s["x_dot_xhat"] += float(dot.sum())
        s["ev_legacy"] += float((1 - resid / (x - x.mean(0)).pow(2).sum(-1).clamp_min(1e-12)).sum())
        s["mse"] += float(resid.sum()) / x.shape[1]
        self.fired += (z > 0).sum(0).cpu()
        self.fired_windows += (z > 0).view(len(batch), -1, z.shape[1]).any(1).sum(0).cpu()
        self.n += len(x)


def max_cosines(W: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per row of W [n, d], the largest cosine with another row."""
    W = W.float()
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(len(W))
    for lo in range(0, len(W), chunk):
        sims = unit[lo : lo + chunk] @ unit.T
        rows = torch.arange(lo, min(lo + chunk, len(W)))
        sims[rows - lo, rows] = -math.inf
        out[lo : lo + chunk] = sims.max(1).values.cpu()
    return out


def core_metrics(ev: EvalResult, meter: CoreMeter, sae: DictionarySAE) -> tuple[dict[str, float], dict, dict]:
    """The flat core metrics (names: result.METRICS), details, and per-latent lists (SAEBench's
    CoreFeatureMetric fields: for the JSON files only, ~1 MB for 8k latents)."""
    n, s = max(meter.n, 1), meter.sums
    density = meter.fired.double() / n
    alive = density > 0
    total = float(density.sum())
    enc_cos = max_cosines(sae.W_enc.detach())
    dec_cos = max_cosines(sae.W_dec.detach())
    kl_zero = ev.kl_zero if ev.kl_zero is not None else math.nan
    metrics = {
        "l0": ev.l0,
        "l1": s["l1"] / n,
        "fvu": ev.fvu,
        "explained_variance": 1 - ev.fvu,
        "explained_variance_legacy": s["ev_legacy"] / n,
        "mse": s["mse"] / n,
        "cossim": s["cossim"] / n,
        "l2_norm_in": s["l2_in"] / n,
        "l2_norm_out": s["l2_out"] / n,
        "l2_ratio": s["l2_ratio"] / n,
        "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"] if s["x_dot_xhat"] else math.nan,
        "ce_loss_recovered": ev.ce_score,
        "ce_loss_with_sae": ev.ce_sae,
        "ce_loss_without_sae": ev.ce_clean,
        "ce_loss_with_ablation": ev.ce_zero,
        "delta_ce": ev.delta_ce,
        "kl_div_with_sae": ev.kl,
        "kl_div_with_ablation": kl_zero,
        "kl_div_score": (kl_zero - ev.kl) / kl_zero if kl_zero else math.nan,
        "dead_fraction": ev.dead_fraction,
        "frac_alive": float(alive.double().mean()),
        "frequency_mean_log10": float(density[alive].log10().mean()) if alive.any() else math.nan,
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total else 0.0,
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total else 0.0,
        "average_max_encoder_cosine_sim": float(enc_cos.mean()),
        "average_max_decoder_cosine_sim": float(dec_cos.mean()),
        "tokens": float(ev.tokens),
    }
    histogram, edges = np.histogram(np.log10(density[alive].numpy()), bins=20) if alive.any() else (np.zeros(0), np.zeros(0))
    details = {"tokens": ev.tokens, "log10_frequency_histogram": {"edges": edges.tolist(), "counts": histogram.tolist()}}
    per_latent = {
        "feature_density": density.float().tolist(),
        # SAEBench: firings per window among the windows where the latent fired (0 where it never did)
        "consistent_activation_heuristic": (meter.fired.double() / meter.fired_windows.clamp_min(1)).float().tolist(),
        "max_encoder_cosine_sim": enc_cos.tolist(),
        "max_decoder_cosine_sim": dec_cos.tolist(),
        "encoder_bias": sae.b_enc.detach().float().cpu().tolist(),
        "encoder_norm": sae.W_enc.detach().float().norm(dim=1).cpu().tolist(),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(sae.W_enc.detach().float(), sae.W_dec.detach().float(), dim=1)
        .cpu()
        .tolist(),
    }
    return metrics, details, per_latent
