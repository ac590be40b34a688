"""Search by meaning for the pages and the API: each SAE's explanations ranked by full text and by
sentence embedding (sae_core/store/explanation_search.py), fused by reciprocal rank.

What it needs, the embedding model and each live run's embedding index, is loaded in the background
when the app starts (MeaningWarmUp), so the first search does not pay for it (6.8 s measured before)
and every page answers meanwhile. A search arriving during that load waits for it without holding the
event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import lru_cache

import numpy as np
from sqlalchemy import Connection, select

from sae_core.errors import SaescopeError
from sae_core.store import explanation_search as store_search
from sae_core.store.schema import SAE, Feature

from . import schemas
from .deps import Reader

CANDIDATES = 100  # per ranking, before fusion
log = logging.getLogger("saescope.search")


@lru_cache(maxsize=1024)
def query_vector(query: str) -> np.ndarray:
    return _embed(query)


def _embed(query: str) -> np.ndarray:
    import torch

    from sae_core.explain.embed import embedder

    # One short query gains nothing from a second thread and loses a lot when the cores are busy
    # (bench/RESULTS.md: p50 582 ms with 2 threads at load 12, ~10 ms with 1). Torch in a page worker
    # serves only this: the live model runs in its own process.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return embedder().encode([query])[0]


class MeaningWarmUp:
    """app.state.meaning: loads each live run's embedding index and, where any run has embeddings, the
    embedding model (and runs it once) in a background thread started with the app."""

    WAIT = 60.0  # seconds a search waits for a load in progress before it loads what it needs itself

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.seconds: float | None = None
        self.error: str | None = None

    def start(self, reader: Reader) -> None:
        self.thread = threading.Thread(target=self._load, args=(reader,), name="meaning-warm-up", daemon=True)
        self.thread.start()

    def _load(self, reader: Reader) -> None:
        start = time.monotonic()
        try:
            # no explanation has an embedding: search by meaning is full text alone, no model to load
            if reader.read_blocking(_embedded_runs):
                _embed("warm-up")
        except Exception as exc:  # noqa: BLE001 - a search then loads what it needs itself, and says what failed
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("search by meaning could not be prepared at start-up: %s", self.error)
        finally:
            self.seconds = time.monotonic() - start
            self.done.set()

    async def ready(self, timeout: float = WAIT) -> None:
        """Return once a load in progress has finished (at most `timeout` s), yielding the event loop meanwhile."""
        deadline = time.monotonic() + timeout
        while self.thread is not None and not self.done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def _embedded_runs(conn: Connection) -> list[int]:
    """The live runs whose explanations have embeddings (their indexes are loaded on the way)."""
    runs = conn.scalars(select(SAE.active_run_id).where(SAE.active_run_id.is_not(None))).all()
    return [run for run in runs if run is not None and store_search.EMBEDDINGS.get(conn, run).keys]


def by_meaning(conn: Connection, query: str, sae_name: str | None, limit: int) -> tuple[list[schemas.ExplanationHit], list[str]]:
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
