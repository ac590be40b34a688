"""The suite's results as SAEBench `BaseEvalOutput` JSON (sae_bench/evals/base_eval_output.py and each
eval's eval_output.py, 0.6.0), so they read beside SAEBench's and Neuronpedia's published results.

One dict per eval type, with SAEBench's field names and metric categories: "core", "sparse_probing",
"meta_structure_decoder_variance", "absorption_first_letter" (only where absorption ran: SAEBench has no
field for "not measured") and "autointerp" (only where LLM detection scores exist). SAEBench's fields
that this suite does not compute the same way are left out (their schemas mark them optional) rather
than filled with a different quantity; where a field is required and ours differs, the difference is
written in docs/concepts.md (explained_variance). `sae_bench_commit_hash` says these numbers come from
saescope's suite, not SAEBench's code, and `eval_result_unstructured` holds our extra details.

`write_files` writes them as <SAE folder>/saebench/seed<N>/<eval_type_id>_eval_results.json; the
store keeps the same dicts, less the core eval's per-latent list (`eval_result_details`, ~1 MB for 8k
latents), which only the file holds.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from .result import SUITE_VERSION, BenchResult
from .sparse_probing import KS

PRODUCER = f"saescope bench-sae suite {SUITE_VERSION} (SAEBench 0.6.0 field names; not SAEBench's code)"
FILE_SUFFIX = "_eval_results.json"


def _base(eval_type: str, result: BenchResult, sae_cfg: dict, eval_config: dict, metrics: dict, details: list, extra: dict) -> dict:
    return {
        "eval_type_id": eval_type,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": PRODUCER,
        "sae_lens_id": result.sae,
        "sae_lens_release_id": "saescope",
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": extra,
    }


def eval_outputs(result: BenchResult, sae_cfg: dict, per_latent: bool = False) -> list[dict]:
    """The BaseEvalOutput dicts of `result`; `per_latent` adds the core eval's per-latent details."""
    m, d, c = result.metrics, result.details, result.config
    model = c.get("model", "")
    out = []
    if "fvu" in m:
        context = int(c.get("context_size", 0))
        batches = -(-int(m.get("tokens", 0)) // max(1, (context - 1) * int(c.get("batch_size", 1))))
        core_cfg = {
            "model_name": model,
            "llm_dtype": c.get("model_dtype", ""),
            "batch_size_prompts": c.get("batch_size", 0),
            "n_eval_reconstruction_batches": batches,
            "n_eval_sparsity_variance_batches": batches,
            "dataset": c.get("corpus", ""),
            "context_size": context,
            "compute_kl": True,
            "compute_ce_loss": True,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": True,
            "verbose": False,
        }
        tokens = int(m.get("tokens", 0))
        metrics = {
            "model_behavior_preservation": {k: m[k] for k in ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")},
            "model_performance_preservation": {
                "ce_loss_score": m["ce_loss_recovered"],
                "ce_loss_with_ablation": m["ce_loss_with_ablation"],
                "ce_loss_with_sae": m["ce_loss_with_sae"],
                "ce_loss_without_sae": m["ce_loss_without_sae"],
            },
            "reconstruction_quality": {k: m[k] for k in ("explained_variance", "explained_variance_legacy", "mse", "cossim")},
            "shrinkage": {k: m[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")},
            "sparsity": {"l0": m["l0"], "l1": m["l1"]},
            "token_stats": {"total_tokens_eval_reconstruction": tokens, "total_tokens_eval_sparsity_variance": tokens},
            "misc_metrics": {
                k: m[k]
                for k in (
                    "freq_over_1_percent",
                    "freq_over_10_percent",
                    "normalized_freq_over_1_percent",
                    "normalized_freq_over_10_percent",
                    "average_max_encoder_cosine_sim",
                    "average_max_decoder_cosine_sim",
                    "frac_alive",
                )
            },
        }
        details = []
        core = result.per_latent
        if per_latent and "feature_density" in core:
            names = (
                "feature_density",
                "consistent_activation_heuristic",
                "encoder_bias",
                "encoder_norm",
                "encoder_decoder_cosine_sim",
                "max_decoder_cosine_sim",
                "max_encoder_cosine_sim",
            )
            details = [{"index": i, **dict(zip(names, values))} for i, values in enumerate(zip(*(core[n] for n in names)))]
        extra: dict = {
            "dead_fraction": m["dead_fraction"],
            "frequency_mean_log10": m.get("frequency_mean_log10"),
            "delta_ce": m["delta_ce"],
        }
        out.append(_base("core", result, sae_cfg, core_cfg, metrics, details, extra))
    if "sparse_probing_top1_accuracy" in m:
        sp_cfg = {
            "random_seed": result.seed,
            "dataset_names": sorted({f"{t['mode']}/{t['name']}" for t in d["sparse_probing"]["tasks"]}),
            "probe_train_set_size": c.get("probe_per_class", 0) * 2,
            "probe_test_set_size": c.get("probe_per_class", 0) * 2,
            "context_length": int(c.get("context_size", 0)),
            "sae_batch_size": 4096,
            "llm_batch_size": c.get("batch_size", 0),
            "llm_dtype": c.get("model_dtype", ""),
            "model_name": model,
            "k_values": list(KS),
            "lower_vram_usage": False,
        }
        sae_metrics: dict[str, float | None] = {f"sae_top_{k}_test_accuracy": m[f"sparse_probing_top{k}_accuracy"] for k in KS}
        sae_metrics["sae_test_accuracy"] = m.get("sae_probe_accuracy")
        details = []
        for t in d["sparse_probing"]["tasks"]:
            row = {"dataset_name": f"{t['mode']}/{t['name']}", "llm_test_accuracy": t["llm"], "sae_test_accuracy": t["sae"]}
            row.update({f"sae_top_{k}_test_accuracy": t[f"top{k}"] for k in KS})
            details.append(row)
        metrics = {"llm": {"llm_test_accuracy": m["llm_probe_accuracy"]}, "sae": sae_metrics}
        out.append(
            _base(
                "sparse_probing",
                result,
                sae_cfg,
                sp_cfg,
                metrics,
                details,
                {"means_by_mode": {k: v for k, v in d["sparse_probing"].items() if k.endswith("_mean")}},
            )
        )
    if "meta_sae_fvu" in m:
        meta = d.get("meta_sae", {})
        meta_cfg = {
            "random_seed": result.seed,
            "width_ratio": m["meta_sae_latents"] / max(c.get("n_latents", 1), 1),
            "k": int(m["meta_sae_k"]),
            "train_steps": meta.get("steps", 0),
            "train_batch_size": 1024,
            "learning_rate": 5e-4,
            "weight_decay": 0.0,
            "autocast": False,
            "eval_batch_size": 0,
            "dead_feature_window": 0,
            "feature_sampling_window": 0,
            "dtype": "float32",
        }
        metrics = {
            "meta_structure": {
                "decoder_fraction_variance_explained": 1 - m["meta_sae_fvu"],
                "train_time_seconds": meta.get("train_time_seconds", 0.0),
                "final_reconstruction_mse": meta.get("mse", 0.0),
            }
        }
        extra = {"architecture": "topk (SAEBench's meta-SAE is BatchTopK)", "decomposed_fraction": m["meta_sae_decomposed_fraction"]}
        out.append(_base("meta_structure_decoder_variance", result, sae_cfg, meta_cfg, metrics, [], extra))
    if result.absorption_valid and "absorption_fraction" in m:
        letters = d["absorption"]["letters"]
        import numpy as np

        def std(key: str) -> float:
            return float(np.std([r[key] for r in letters]))

        ab_cfg = {
            "model_name": model,
            "random_seed": result.seed,
            "f1_jump_threshold": 0.03,
            "max_k_value": 10,
            "prompt_template": "{word} has the first letter:",
            "prompt_token_pos": -1,
            "llm_batch_size": 64,
            "llm_dtype": c.get("model_dtype", ""),
            "k_sparse_probe_l1_decay": 0.0,
            "k_sparse_probe_batch_size": 0,
            "k_sparse_probe_num_epochs": 0,
            "min_GT_probe_f1": c.get("absorption_min_f1", 0.8),
            "min_feats_for_eval": 0,
            "eval_k_sparse_probe_batch_size": 0,
            "precalc_k_sparse_probe_sae_acts": False,
        }
        metrics = {
            "mean": {
                "mean_absorption_fraction_score": m["absorption_fraction"],
                "mean_full_absorption_score": m["absorption_full_fraction"],
                "mean_num_split_features": m["absorption_num_split_features"],
                "std_dev_absorption_fraction_score": std("mean_absorption_fraction"),
                "std_dev_full_absorption_score": std("full_absorption_rate"),
                "std_dev_num_split_features": std("num_split_features"),
            }
        }
        fields = (
            "first_letter",
            "mean_absorption_fraction",
            "full_absorption_rate",
            "num_full_absorption",
            "num_probe_true_positives",
            "num_split_features",
        )
        details = [{k: r[k] for k in fields} for r in letters]
        extra = {"first_letter_probe_f1": m["absorption_first_letter_probe_f1"]}
        out.append(_base("absorption_first_letter", result, sae_cfg, ab_cfg, metrics, details, extra))
    if "llm_detection_score" in m:
        interp = d.get("interpretability", {})
        ai_cfg = {"model_name": model, "random_seed": result.seed, "scoring": True, "n_latents": interp.get("llm_detection_features")}
        metrics = {
            "autointerp": {
                "autointerp_score": m["llm_detection_score"],
                "autointerp_std_dev": interp.get("llm_detection_std", 0.0),
            }
        }
        method = "delphi-style detection: " + interp.get("llm_detection_source", "saescope explain --method llm")
        out.append(_base("autointerp", result, sae_cfg, ai_cfg, metrics, [], {"method": method}))
    return out


def write_files(result: BenchResult, sae_cfg: dict, folder: str | Path) -> list[Path]:
    """Write each eval type's BaseEvalOutput JSON under <folder>/saebench/seed<N>/ (per-latent details included)."""
    out_dir = Path(folder) / "saebench" / f"seed{result.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for output in eval_outputs(result, sae_cfg, per_latent=True):
        path = out_dir / f"{output['eval_type_id']}{FILE_SUFFIX}"
        path.write_text(json.dumps(output, indent=2, default=str))
        paths.append(path)
    return paths
