"""Evaluate a saved SAE on held-out text: `saescope eval` (metric definitions: docs/concepts.md and the README).

Held-out tokens are corpus windows that come after the ones the training cache holds, in the same
document order, so no evaluation token was trained on; one window in every `window_stride`, so that they
come from many documents and sources, not the one or two that consecutive windows can fall in (the
probe tasks need labelled tokens of several: `corpus.spread_windows`). Per batch of windows the clean full
forward gives the hook's output (for the reconstruction metrics) and the clean logits; then only the
layers after the hook run twice more for the downstream metrics, from the SAE's reconstruction spliced
in at the hook and from the hook's output zeroed (`LanguageModel.start_after`: the layers up to the
hook run once per batch, not four times). Splicing and zeroing leave the skipped positions (the
attention sink) untouched, the same positions the SAE never trained on.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from . import corpus as corpus_mod
from .config import EvalConfig
from .errors import SaescopeError
from .interchange import LoadedSAE, load_sae
from .metrics.ablation import AblationMeter
from .metrics.labels import TokenLabeller
from .metrics.probe import ProbeCollector
from .model import LanguageModel, load_model, parse_hook

RESULT = "eval.json"


@dataclass
class EvalResult:
    tokens: int
    l0: float  # mean active latents per token
    fvu: float  # fraction of variance unexplained
    dead_fraction: float  # latents that never fired on these tokens
    rare_fraction: float  # latents firing on fewer than 1e-5 of tokens (dead ones included)
    ce_clean: float  # next-token cross-entropy of the unmodified model (nats)
    ce_sae: float  # ... with the SAE reconstruction spliced in
    ce_zero: float  # ... with the hook's output zero-ablated
    delta_ce: float  # ce_sae - ce_clean
    ce_score: float  # (ce_zero - ce_sae) / (ce_zero - ce_clean): share of the loss recovered
    kl: float  # mean KL(clean || sae) of the next-token distributions
    # Gao et al. 2024 §4 (sae_core/metrics, docs/concepts.md); None where skipped or the corpus has no labels
    probe_loss: float | None = None  # mean over tasks of the best single-latent logistic probe's cross-entropy (nats)
    probe_tasks: list[dict] = field(default_factory=list)  # per task: name, per_class, loss, latent
    ablation_sparsity: float | None = None  # mean (L1/L2)^2 / (V T) of the logit changes of one-latent ablations
    ablations: int = 0  # ablations that mean is over
    kl_zero: float | None = None  # mean KL(clean || zero-ablated): SAEBench's kl_div_with_ablation


@dataclass
class _Sums:
    """Running totals over the evaluated positions (reconstruction) and predictions (downstream)."""

    sum_x: torch.Tensor
    n: int = 0
    active: int = 0
    sq_err: float = 0.0
    sum_sq: float = 0.0
    ce_clean: float = 0.0
    ce_sae: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    kl_zero: float = 0.0
    n_pred: int = 0


# Called per batch with the windows, the skipped leading positions, and the evaluated positions' hook
# output x [n, d], codes z [n, latents] and reconstruction x_hat [n, d] (the benchmark suite's extra
# metrics and probing data, sae_core/evaluation/, ride on the same forward passes).
Observer = Callable[[corpus_mod.Windows, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def evaluate(sae_dir: Path, cfg: EvalConfig, lm: LanguageModel | None = None, progress: bool = True) -> EvalResult:
    """Evaluate the SAE in `sae_dir` and write its eval.json there."""
    result = evaluate_loaded(load_sae(sae_dir), sae_dir, cfg, lm, progress)
    (Path(sae_dir) / RESULT).write_text(json.dumps(asdict(result), indent=2))
    return result


def evaluate_loaded(
    loaded: LoadedSAE,
    sae_dir: str | Path,
    cfg: EvalConfig,
    lm: LanguageModel | None = None,
    progress: bool = True,
    observers: Sequence[Observer] = (),
) -> EvalResult:
    """`evaluate` of an SAE already loaded (`sae_dir` names it in messages); writes nothing. Each of
    `observers` sees every batch's activations, codes and reconstructions."""
    sae, prov = loaded.sae, loaded.provenance
    model_name, hook = prov.require(sae_dir)
    layer = parse_hook(hook)
    lm = lm or load_model(model_name, cfg.device, cfg.model_dtype)
    lm.check_layer(layer)
    if lm.d_model != sae.cfg.d_in:
        raise SaescopeError(f"the SAE reads width {sae.cfg.d_in} but {lm.name} layer {layer} has width {lm.d_model}")
    sae = sae.to(lm.device)
    context, skip = prov.context_size, prov.skip_positions
    corpus = corpus_mod.open_corpus(prov.corpus)
    n_windows = -(-cfg.tokens // context)
    # held out: after the trained windows
    windows = corpus_mod.spread_windows(corpus, lm.tokenizer, context, prov.seed, prov.trained_windows, n_windows, cfg.window_stride)
    probes = ProbeCollector(TokenLabeller(corpus, lm.tokenizer), cfg.probe_per_class, prov.seed) if cfg.probe_per_class else None
    ablations = AblationMeter(lm, sae, layer, skip, cfg.ablation_positions, cfg.ablation_horizon) if cfg.ablation_positions else None

    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=lm.device)
    sums = _Sums(sum_x=torch.zeros(lm.d_model, dtype=torch.float64))
    bar = tqdm(total=n_windows * context, unit="tok", unit_scale=True, desc="evaluating", disable=not progress, dynamic_ncols=True)
    done = 0
    with torch.inference_mode():
        while done < n_windows:
            parts = list(itertools.islice(windows, min(cfg.batch_size, n_windows - done)))
            if not parts:
                break
            batch = corpus_mod.Windows.cat(parts)
            ids = torch.from_numpy(batch.tokens).long().to(lm.device)
            logits, h = lm.logits_and_residual(ids, layer)
            clean = _logprobs(logits, skip)
            del logits  # [batch, context, vocab]: keep no more of these alive than needed
            x = h[:, skip:].float().reshape(-1, lm.d_model)
            z = sae.encode(x)
            x_hat = sae(x)
            fired += (z > 0).sum(0)
            sums.n += len(x)
            sums.active += int((z > 0).sum())
            sums.sq_err += float((x - x_hat).pow(2).sum())
            sums.sum_x += x.double().sum(0).cpu()
            sums.sum_sq += float(x.double().pow(2).sum())
            _downstream(lm, ids, layer, skip, clean, h, x_hat.view(len(batch), -1, lm.d_model), sums)
            if probes is not None:
                probes.add(batch.doc_index[:, skip:], batch.doc_offset[:, skip:], x)
            if ablations is not None:
                ablations.add(ids, h)
            for observe in observers:
                observe(batch, skip, x, z, x_hat)
            done += len(batch)
            bar.update(len(batch) * context)
    bar.close()
    if sums.n == 0:
        raise SaescopeError("the corpus has no held-out windows left after the training cache; evaluate on a longer corpus")
    n = sums.n
    total_var = sums.sum_sq - float(sums.sum_x.pow(2).sum()) / n
    density = fired.float() / n
    ce = {k: getattr(sums, k) / sums.n_pred for k in ("ce_clean", "ce_sae", "ce_zero", "kl", "kl_zero")}
    probe = probes.fit(sae, cfg.probe_candidates) if probes is not None else None
    ablation = ablations.report() if ablations is not None else None
    result = EvalResult(
        tokens=n,
        l0=sums.active / n,
        fvu=sums.sq_err / total_var,
        dead_fraction=float((fired == 0).float().mean()),
        rare_fraction=float((density < 1e-5).float().mean()),
        ce_clean=ce["ce_clean"],
        ce_sae=ce["ce_sae"],
        ce_zero=ce["ce_zero"],
        delta_ce=ce["ce_sae"] - ce["ce_clean"],
        ce_score=(ce["ce_zero"] - ce["ce_sae"]) / max(ce["ce_zero"] - ce["ce_clean"], 1e-12),
        kl=ce["kl"],
        probe_loss=probe.loss if probe else None,
        probe_tasks=[asdict(task) for task in probe.tasks] if probe else [],
        ablation_sparsity=ablation.sparsity if ablation else None,
        ablations=ablation.ablations if ablation else 0,
        kl_zero=ce["kl_zero"],
    )
    return result


def _logprobs(logits: torch.Tensor, skip: int) -> torch.Tensor:
    return logits[:, skip:-1].float().log_softmax(-1)


def _downstream(
    lm: LanguageModel, ids: torch.Tensor, layer: int, skip: int, clean: torch.Tensor, h: torch.Tensor, x_hat: torch.Tensor, sums: _Sums
) -> None:
    """Add this batch's clean / spliced / zero-ablated cross-entropies and KL to `sums`, given the clean
    forward's log-probabilities, the hook's output `h` in it and the SAE's reconstruction `x_hat` of h[:, skip:]."""
    spliced_h, zeroed_h = h.clone(), h.clone()
    spliced_h[:, skip:] = x_hat.to(h.dtype)
    zeroed_h[:, skip:] = 0
    targets = ids[:, skip + 1 :]
    with lm.start_after(layer, spliced_h):
        spliced = _logprobs(lm.model(input_ids=ids, use_cache=False).logits, skip)
    with lm.start_after(layer, zeroed_h):
        zeroed = _logprobs(lm.model(input_ids=ids, use_cache=False).logits, skip)
    sums.ce_clean += float(-clean.gather(-1, targets.unsqueeze(-1)).sum())
    sums.ce_sae += float(-spliced.gather(-1, targets.unsqueeze(-1)).sum())
    sums.ce_zero += float(-zeroed.gather(-1, targets.unsqueeze(-1)).sum())
    sums.kl += float((clean.exp() * (clean - spliced)).sum())
    sums.kl_zero += float((clean.exp() * (clean - zeroed)).sum())
    sums.n_pred += targets.numel()
