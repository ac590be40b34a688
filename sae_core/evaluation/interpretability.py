"""Interpretability from our explainers (sae_core/explain): N2G's held-out F1 (Gao et al. 2024 §4.4)
and, with an LLM endpoint or stored LLM explanations, the delphi-style detection score (explain/llm.py).

N2G: the mean held-out F1 (`explanations.score`) over the features of the SAE's visible mining run that
`saescope explain` explained; where it has not been run, N2G explains and scores a seeded sample of
`n2g_features` fired features from their mined contexts here (nothing is written). LLM detection
(balanced accuracy at telling held-out activating contexts from other features'): where an endpoint is
configured (bench-sae's --api-base and --llm-model, explain's LLM settings), the LLM explainer and its
detection scorer (explain/llm.py, the ones `saescope explain --method llm` uses) run here on a seeded
sample of `llm_features` fired features, nothing written; otherwise the mean of the stored LLM
explanations' detection scores; without either the metric is absent. SAEBench's autointerp eval is the
same kind of score (an LLM judges held-out contexts); its JSON carries ours under autointerp_score only
when there is one.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import Connection, func, select

from ..config import ExplainConfig
from ..explain.contexts import read_contexts
from ..explain.n2g import N2GExplainer, N2GSettings
from ..explain.stage import explain_one, read_vocab
from ..store.schema import SAE, Explanation, Feature, MiningRun


def _fired_sample(conn: Connection, run_id: int, n: int, seed: int) -> list[int]:
    """A seeded sample of `n` of the run's fired features, in index order."""
    fired = conn.execute(select(Feature.index).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)).scalars().all()
    if not fired:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(fired, min(n, len(fired)), replace=False).tolist())


def llm_detection(conn: Connection, run_id: int, llm: ExplainConfig, n_features: int, seed: int) -> tuple[list[float], dict]:
    """Explain a seeded sample of fired features with the LLM and score each explanation by detection on
    its held-out contexts (the explainer and scorer of `saescope explain --method llm`); the detection
    scores (features the scorer could not judge left out) and what the run cost."""
    from ..explain.llm import LLMExplainer

    model_id = conn.execute(select(SAE.model_id).join(MiningRun, MiningRun.sae_id == SAE.id).where(MiningRun.id == run_id)).scalar_one()
    explainer = LLMExplainer.from_config(llm, read_vocab(conn, model_id), seed)
    contexts = read_contexts(conn, run_id, _fired_sample(conn, run_id, n_features, seed))
    explainer.prepare(contexts)  # the sample's top contexts: the non-activating examples of detection
    scores: list[float] = []
    for feature in contexts:
        detection = explain_one(explainer, explainer, feature)[1].scores.get("detection")
        if detection is not None:
            scores.append(float(detection))
    return scores, {"features_sampled": len(contexts), "model": llm.model, "usage": explainer.usage}


def interpretability_metrics(
    conn: Connection, run_id: int, n_features: int, seed: int, llm: ExplainConfig | None = None, llm_features: int = 32
) -> tuple[dict[str, float], dict]:
    metrics: dict[str, float] = {}
    details: dict = {}
    n, mean = conn.execute(
        select(func.count(Explanation.score), func.avg(Explanation.score)).where(Explanation.run_id == run_id, Explanation.method == "n2g")
    ).one()
    if n:
        metrics["n2g_f1"], metrics["n2g_features"] = float(mean), float(n)
        details["n2g_source"] = "stored explanations (saescope explain)"
    else:
        sample = _fired_sample(conn, run_id, n_features, seed)
        if sample:
            cfg = ExplainConfig()
            n2g = N2GExplainer(N2GSettings(cfg.fire_fraction, cfg.max_pattern_len, cfg.min_precision, cfg.max_patterns))
            contexts = read_contexts(conn, run_id, sample)
            n2g.prepare(contexts)
            scores = [s.score for s in (explain_one(n2g, n2g, f)[1] for f in contexts) if s.score is not None]
            if scores:
                metrics["n2g_f1"], metrics["n2g_features"] = float(np.mean(scores)), float(len(scores))
                details["n2g_source"] = f"N2G on a sample of {len(sample)} fired features (seed {seed})"
    if llm is not None:
        detections, run = llm_detection(conn, run_id, llm, llm_features, seed)
        sampled = run["features_sampled"]
        details["llm_detection_source"] = f"{llm.model} explained and detection-scored {sampled} fired features (seed {seed})"
        details["llm_usage"] = run["usage"]
    else:
        stored = conn.execute(select(Explanation.scores).where(Explanation.run_id == run_id, Explanation.method == "llm")).scalars()
        detections = [float(s["detection"]) for s in stored if s.get("detection") is not None]
        details["llm_detection_source"] = "stored explanations (saescope explain --method llm)"
    if detections:
        metrics["llm_detection_score"] = float(np.mean(detections))
        details["llm_detection_features"] = len(detections)
        details["llm_detection_std"] = float(np.std(detections))
    else:
        del details["llm_detection_source"]
        details["llm_detection"] = (
            "absent: the LLM judged none of the sampled features' held-out contexts"
            if llm is not None
            else "absent: no LLM endpoint configured (--api-base, --llm-model) and no LLM explanations of this run "
            "(saescope explain --method llm)"
        )
    return metrics, details
