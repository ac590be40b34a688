"""Interpretability from our explainers (sae_core/explain): N2G's held-out F1 (Gao et al. 2024 §4.4)
and, where an LLM explained the SAE, the delphi-style detection score (explain/llm.py).

N2G: the mean held-out F1 (`explanations.score`) over the features of the SAE's visible mining run that
`saescope explain` explained; where it has not been run, N2G explains and scores a seeded sample of
`n2g_features` fired features from their mined contexts here (nothing is written). LLM detection: the
mean of the stored LLM explanations' detection scores (balanced accuracy at telling held-out activating
contexts from other features'); `saescope explain --method llm` with an endpoint configured makes them,
and without them the metric is absent. SAEBench's autointerp eval is the same kind of score (an LLM
judges held-out contexts); its JSON carries ours under autointerp_score only when the LLM scores exist.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import Connection, func, select

from ..config import ExplainConfig
from ..explain.contexts import read_contexts
from ..explain.n2g import N2GExplainer, N2GSettings
from ..explain.stage import explain_one
from ..store.schema import Explanation, Feature


def interpretability_metrics(conn: Connection, run_id: int, n_features: int, seed: int) -> tuple[dict[str, float], dict]:
    metrics: dict[str, float] = {}
    details: dict = {}
    n, mean = conn.execute(
        select(func.count(Explanation.score), func.avg(Explanation.score)).where(Explanation.run_id == run_id, Explanation.method == "n2g")
    ).one()
    if n:
        metrics["n2g_f1"], metrics["n2g_features"] = float(mean), float(n)
        details["n2g_source"] = "stored explanations (saescope explain)"
    else:
        fired = (
            conn.execute(select(Feature.index).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)).scalars().all()
        )
        if fired:
            rng = np.random.default_rng(seed)
            sample = sorted(rng.choice(fired, min(n_features, len(fired)), replace=False).tolist())
            cfg = ExplainConfig()
            n2g = N2GExplainer(N2GSettings(cfg.fire_fraction, cfg.max_pattern_len, cfg.min_precision, cfg.max_patterns))
            contexts = read_contexts(conn, run_id, sample)
            n2g.prepare(contexts)
            scores = [s.score for s in (explain_one(n2g, n2g, f)[1] for f in contexts) if s.score is not None]
            if scores:
                metrics["n2g_f1"], metrics["n2g_features"] = float(np.mean(scores)), float(len(scores))
                details["n2g_source"] = f"N2G on a sample of {len(sample)} fired features (seed {seed})"
    detections = [
        s.get("detection")
        for s in conn.execute(select(Explanation.scores).where(Explanation.run_id == run_id, Explanation.method == "llm")).scalars()
    ]
    detections = [d for d in detections if d is not None]
    if detections:
        metrics["llm_detection_score"] = float(np.mean(detections))
        details["llm_detection_features"] = len(detections)
        details["llm_detection_std"] = float(np.std(detections))
    else:
        details["llm_detection"] = "absent: no LLM explanations of this run (saescope explain --method llm with an endpoint configured)"
    return metrics, details
