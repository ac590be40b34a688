"""`saescope bench-sae`'s options (one light module: building the CLI imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import db_option, device_option, model_dtype_option, option


@dataclass
class BenchConfig:
    sae: str = option("", "The SAE to benchmark: its name in the store (saescope mine stored it).", param_decls=["--sae"])
    seed: int = option(
        0, "Seed of every random draw of the suite (held-out windows' order, probe splits, meta-SAE); one stored result per seed."
    )
    tokens: int = option(16384, "Core metrics: held-out tokens (the corpus windows after the training cache).", min=1)
    batch_size: int = option(8, "Windows per forward pass.", min=1)
    window_stride: int = option(16, "One held-out window in every N (windows from many documents and sources).", min=1)
    probe_tokens: int = option(
        32768, "Sparse probing: held-out tokens read for the probing tasks (split half train, half test by document).", min=1
    )
    probe_per_class: int = option(
        1024, "Sparse probing: examples per class of each task and split (balanced; fewer where the corpus has fewer).", min=8
    )
    meta_sae_latents: int = option(0, "Meta-SAE: latents (0: a quarter of the SAE's latents).", min=0)
    meta_sae_k: int = option(4, "Meta-SAE: active meta-latents per decoder row (TopK).", min=1)
    meta_sae_steps: int = option(2000, "Meta-SAE: training steps (Adam, batches of 1024 decoder rows).", min=1)
    absorption_min_f1: float = option(
        0.8, "Absorption runs only where the model's first-letter probes reach this mean F1 (SAEBench assumes accurate probes)."
    )
    n2g_features: int = option(512, "Interpretability: features scored by N2G when the store has no N2G explanations of the SAE.", min=1)
    db: str | None = db_option()
    device: str = device_option()
    model_dtype: str = model_dtype_option()
