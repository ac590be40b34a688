"""Search by meaning for the pages and the API: each SAE's explanations ranked by full text and by
sentence embedding (sae_core/store/search.py), fused by reciprocal rank."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from sae_core.errors import SaescopeError
from sae_core.store import search as store_search
from sae_core.store.schema import SAE, Feature

from . import schemas

CANDIDATES = 100  # per ranking, before fusion


@lru_cache(maxsize=1024)
def query_vector(query: str) -> np.ndarray:
    import torch

    from sae_core.explain.embed import embedder

    # One short query gains nothing from a second thread and loses a lot when the cores are busy
    # (bench/RESULTS.md: p50 582 ms with 2 threads at load 12, ~10 ms with 1). Torch in a page worker
    # serves only this: the live model runs in its own process.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return embedder().encode([query])[0]


def by_meaning(s: Session, query: str, sae_name: str | None, limit: int) -> tuple[list[schemas.ExplanationHit], list[str]]:
    conn = s.connection()
    stmt = select(SAE.name, SAE.active_run_id).where(SAE.active_run_id.is_not(None)).order_by(SAE.name)
    if sae_name is not None:
        stmt = stmt.where(SAE.name == sae_name)
    hits: list[schemas.ExplanationHit] = []
    notes: list[str] = []
    vector = None
    for name, run_id in conn.execute(stmt).all():
        assert run_id is not None  # selected for a live run
        text_hits = store_search.full_text(conn, run_id, query, CANDIDATES)
        semantic_hits: list[store_search.Match] = []
        if store_search.EMBEDDINGS.get(conn, run_id).keys:
            try:
                vector = query_vector(query) if vector is None else vector
                semantic_hits = store_search.semantic(conn, run_id, vector, CANDIDATES)
            except SaescopeError as exc:  # the model is not installed: full text alone, and say so
                notes = [f"semantic search unavailable: {exc}"]
        fused = store_search.fuse(text_hits, semantic_hits, limit=limit)
        if not fused:
            continue
        text_rank = _ranks(text_hits)
        sem_rank = _ranks(semantic_hits)
        cosine = {m.feature_index: m.score for m in reversed(semantic_hits)}
        indices = [i for i, _ in fused]
        texts = store_search.explanation_texts(conn, run_id, indices)
        density = dict(
            conn.execute(select(Feature.index, Feature.density).where(Feature.run_id == run_id, Feature.index.in_(indices))).all()
        )
        for i, score in fused:
            best = max(texts.get(i, []), key=lambda t: (t[2] is not None, t[2] or 0.0), default=(None, None, None))
            hits.append(
                schemas.ExplanationHit(
                    sae=name,
                    index=i,
                    score=score,
                    full_text_rank=text_rank.get(i),
                    semantic_rank=sem_rank.get(i),
                    cosine=cosine.get(i),
                    explanation=best[1],
                    method=best[0],
                    explanation_score=best[2],
                    density=density.get(i),
                )
            )
    hits.sort(key=lambda h: (-h.score, h.sae, h.index))
    return hits[:limit], notes


def _ranks(matches: list[store_search.Match]) -> dict[int, int]:
    out: dict[int, int] = {}
    for m in matches:
        out.setdefault(m.feature_index, len(out) + 1)
    return out
