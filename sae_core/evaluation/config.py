"""`saescope bench-sae`'s options (one light module: building the CLI imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import db_option, device_option, model_dtype_option, option


@dataclass
class BenchConfig:
    sae: str = option("", "The SAE to benchmark: its name in the store (saescope mine stored it).", param_decls=["--sae"])
    seed: int = option(
        0,
        "Seed of the suite's random draws (probe splits and classes, meta-SAE, N2G sample, absorption words); one stored result per seed.",
    )
    tokens: int = option(
        32768, "Held-out tokens (the corpus windows after the training cache): core metrics, and the sparse-probing tasks' examples.", min=1
    )
    batch_size: int = option(8, "Windows per forward pass.", min=1)
    window_stride: int = option(16, "One held-out window in every N (windows from many documents and sources).", min=1)
    probe_per_class: int = option(
        1024, "Sparse probing: examples per class of each task and split (balanced; fewer where the corpus has fewer).", min=8
    )
    meta_sae_latents: int = option(0, "Meta-SAE: latents (0: a quarter of the SAE's latents).", min=0)
    meta_sae_k: int = option(4, "Meta-SAE: active meta-latents per decoder row (TopK).", min=1)
    meta_sae_steps: int = option(1500, "Meta-SAE: training steps (Adam at 5e-4, batches of 1024 decoder rows; SAEBench's 1500).", min=1)
    absorption_min_f1: float = option(
        0.8, "Absorption runs only where the model's first-letter probes reach this mean F1 (SAEBench assumes accurate probes)."
    )
    absorption_words: int = option(
        1500, "Absorption: vocabulary words (single tokens, a space and letters) read by the first-letter probes.", min=52
    )
    n2g_features: int = option(512, "Interpretability: features scored by N2G when the store has no N2G explanations of the SAE.", min=1)
    db: str | None = db_option()
    device: str = device_option()
    model_dtype: str = model_dtype_option()
