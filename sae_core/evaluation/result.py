"""What one run of the benchmark suite gives (stored in `sae_benchmarks`, one row per SAE and seed).

`BenchResult.metrics` is flat, {metric name: number}, the names below exactly: the SAE page and the
/compare page (helper G) read them from `sae_benchmarks.results`. A metric the suite could not compute
(no labelled tasks, no LLM endpoint, absorption skipped) is absent, never a made-up number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..store.benchmarks import StoredBenchmark

SUITE_VERSION = "1"

# name -> (group, one-line meaning). Higher is better unless the meaning says otherwise.
METRICS: dict[str, tuple[str, str]] = {
    # core (SAEBench core eval; sae_core/evaluation/core.py)
    "l0": ("core", "mean active latents per token"),
    "l1": ("core", "mean L1 norm of the latent codes per token"),
    "fvu": ("core", "fraction of variance unexplained (lower is better)"),
    "explained_variance": ("core", "1 - mean squared error / variance of the input, per token"),
    "explained_variance_legacy": ("core", "SAEBench's legacy form: mean over tokens of 1 - |x - x_hat|^2 / |x - batch mean|^2"),
    "mse": ("core", "mean squared reconstruction error per dimension (lower is better)"),
    "cossim": ("core", "mean cosine of input and reconstruction"),
    "l2_norm_in": ("core", "mean L2 norm of the input"),
    "l2_norm_out": ("core", "mean L2 norm of the reconstruction"),
    "l2_ratio": ("core", "mean of |x_hat| / |x| per token: shrinkage (1 is none)"),
    "relative_reconstruction_bias": ("core", "E[x_hat . x_hat] / E[x_hat . x]: the best scale of x_hat is its inverse (1 is unbiased)"),
    "ce_loss_recovered": ("core", "share of the next-token loss recovered: (CE zero-ablated - CE with SAE) / (CE zero-ablated - CE clean)"),
    "ce_loss_with_sae": ("core", "next-token cross-entropy with the reconstruction spliced in (nats)"),
    "ce_loss_without_sae": ("core", "next-token cross-entropy of the unmodified model (nats)"),
    "ce_loss_with_ablation": ("core", "next-token cross-entropy with the hook's output zeroed (nats)"),
    "delta_ce": ("core", "CE with SAE - clean CE (nats, lower is better)"),
    "kl_div_with_sae": ("core", "mean KL(clean || with SAE) of next-token distributions (lower is better)"),
    "kl_div_with_ablation": ("core", "mean KL(clean || zero-ablated)"),
    "kl_div_score": ("core", "(KL ablated - KL with SAE) / KL ablated"),
    "dead_fraction": ("core", "latents that never fired on the held-out tokens (lower is better)"),
    "frac_alive": ("core", "1 - dead_fraction"),
    "frequency_mean_log10": ("core", "mean log10 firing frequency of the alive latents"),
    "freq_over_1_percent": ("core", "share of latents firing on more than 1% of tokens"),
    "freq_over_10_percent": ("core", "share of latents firing on more than 10% of tokens (dense latents; lower is better)"),
    "normalized_freq_over_1_percent": ("core", "share of all firings made by latents firing on more than 1% of tokens"),
    "normalized_freq_over_10_percent": ("core", "share of all firings made by latents firing on more than 10% of tokens"),
    "tokens": ("core", "held-out tokens evaluated"),
    "average_max_decoder_cosine_sim": ("core", "mean over latents of the largest cosine to another decoder row (lower: less redundancy)"),
    "average_max_encoder_cosine_sim": ("core", "mean over latents of the largest cosine to another encoder row"),
    # sparse probing (sparse_probing.py)
    "sparse_probing_top1_accuracy": (
        "sparse probing",
        "test accuracy of a logistic probe on the 1 latent of largest mean difference (mean over tasks)",
    ),
    "sparse_probing_top2_accuracy": ("sparse probing", "... on the top 2 latents"),
    "sparse_probing_top5_accuracy": ("sparse probing", "... on the top 5 latents"),
    "sparse_probing_top20_accuracy": ("sparse probing", "... on the top 20 latents"),
    "sae_probe_accuracy": ("sparse probing", "... on every latent (the SAE's own ceiling)"),
    "llm_probe_accuracy": ("sparse probing", "... on the model's activations themselves: the ceiling"),
    # meta-SAE (meta_sae.py)
    "meta_sae_fvu": (
        "meta-SAE",
        "FVU of a small TopK SAE trained on the decoder rows (lower: decoder rows are combinations of fewer directions)",
    ),
    "meta_sae_decomposed_fraction": ("meta-SAE", "share of decoder rows the meta-SAE reconstructs to cosine > 0.7"),
    "meta_sae_latents": ("meta-SAE", "meta-latents the meta-SAE has"),
    "meta_sae_k": ("meta-SAE", "meta-latents active per decoder row"),
    # interpretability (interpretability.py)
    "n2g_f1": ("interpretability", "mean held-out F1 of N2G explanations (precision and recall of the token patterns)"),
    "n2g_features": ("interpretability", "features that mean is over"),
    "llm_detection_score": (
        "interpretability",
        "mean detection score (delphi-style) of LLM explanations: a seeded sample scored here where an endpoint is configured "
        "(--api-base, --llm-model), else those saescope explain --method llm stored",
    ),
    # absorption (absorption.py)
    "absorption_first_letter_probe_f1": (
        "absorption",
        "mean F1 over letters of logistic first-letter probes on the model's activations at the hook",
    ),
    "absorption_fraction": (
        "absorption",
        "share of a letter's tokens where its main latents fail and another latent absorbs the direction (mean over letters, lower better)",
    ),
    "absorption_full_fraction": ("absorption", "share of such tokens where the main latents do not fire at all (lower is better)"),
    "absorption_num_split_features": ("absorption", "mean main latents per letter (k of the k-sparse probe, grown while F1 rises > 0.03)"),
    "absorption_main_latent_f1": ("absorption", "mean test F1 of the main latents' k-sparse probe per letter"),
}
SPARSE_PROBING_KS = (1, 2, 5, 20)


@dataclass
class BenchResult:
    sae: str  # the SAE's name in the store
    seed: int
    metrics: dict[str, float]  # flat, keys from METRICS
    absorption_valid: bool | None = None  # None: not measured; False: the first-letter probes are too weak to mean anything
    details: dict[str, Any] = field(default_factory=dict)  # per eval: per task / per letter / timings
    saebench: list[dict] = field(default_factory=list)  # SAEBench BaseEvalOutput dicts, one per eval type
    config: dict[str, Any] = field(default_factory=dict)
    suite_version: str = SUITE_VERSION
    per_latent: dict[str, list] = field(default_factory=dict, repr=False)  # core's per-latent lists: JSON files only, not stored

    def results(self) -> dict[str, Any]:
        """The `sae_benchmarks.results` column: the flat metrics plus "absorption_valid" and "details"."""
        return {**self.metrics, "absorption_valid": self.absorption_valid, "details": self.details}

    def stored(self) -> StoredBenchmark:
        """The row `store.benchmarks.save_benchmark` writes."""
        from ..store.benchmarks import StoredBenchmark

        return StoredBenchmark(self.sae, self.seed, self.suite_version, self.results(), self.saebench, self.config)

    @classmethod
    def from_stored(cls, row: StoredBenchmark) -> BenchResult:
        results = dict(row.results)
        valid, details = results.pop("absorption_valid", None), results.pop("details", {})
        metrics = {k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return cls(row.sae, row.seed, metrics, valid, details, row.saebench, row.config, row.suite_version)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-latent lists."""
        out = asdict(self)
        out.pop("per_latent")
        return out
