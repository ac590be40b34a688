"""Finding features by what their explanations say: full-text search (SQLite FTS5 with Porter stemming,
PostgreSQL full-text search with the 'english' configuration: one function for both), semantic search
over the stored sentence embeddings, and the two fused by reciprocal rank.

Both full-text paths read `explanations.search_text` (the explanation plus the words of its patterns and
of the tokens its top contexts peak on); a phrase is matched word by word with OR, so "dialogue
attribution" still finds a feature that only says "said". Semantic search takes the phrase embedded by
its caller with the same model as the explanations (sae_core/explain/embed.py; the store does not load
it) and ranks by cosine similarity over an in-memory matrix per run, rebuilt when the SAE's revision
changes (explanations written). The app's search by meaning (app/meaning_search.py) puts these together."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Connection, bindparam, select, text

from .codec import unpack_embeddings
from .schema import SAE, Explanation

if TYPE_CHECKING:
    import faiss

WORD = re.compile(r"\w+", re.UNICODE)
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): score = sum of 1 / (K + rank)


@dataclass
class Match:
    feature_index: int
    method: str
    score: float  # full text: higher is better (negated bm25, or ts_rank); semantic: cosine


def words(query: str, limit: int = 16) -> list[str]:
    return [w.lower() for w in WORD.findall(query)][:limit]


def full_text(conn: Connection, run_id: int, query: str, limit: int = 50) -> list[Match]:
    """Explanations of run `run_id` whose search text contains any word of `query`, best first."""
    terms = words(query)
    if not terms:
        return []
    if conn.dialect.name == "postgresql":
        tsquery = " | ".join(terms)  # words only (\w+): nothing for to_tsquery to misparse
        rows = conn.execute(
            text(
                "SELECT feature_index, method, ts_rank(to_tsvector('english', search_text), q) AS rank "
                "FROM explanations, to_tsquery('english', :q) AS q "
                "WHERE run_id = :run AND to_tsvector('english', search_text) @@ q ORDER BY rank DESC, feature_index LIMIT :limit"
            ),
            {"q": tsquery, "run": run_id, "limit": limit},
        ).all()
        return [Match(i, m, float(r)) for i, m, r in rows]
    match = " OR ".join(f'"{t}"' for t in terms)  # quoted: FTS5 operators in the query are plain words
    rows = conn.execute(
        text(
            "SELECT e.feature_index, e.method, bm25(explanations_fts) AS rank FROM explanations_fts "
            "JOIN explanations e ON e.id = explanations_fts.rowid "
            "WHERE explanations_fts MATCH :q AND e.run_id = :run ORDER BY rank, e.feature_index LIMIT :limit"
        ),
        {"q": match, "run": run_id, "limit": limit},
    ).all()
    return [Match(i, m, -float(r)) for i, m, r in rows]


EXACT_MAX = 50_000  # a run with more embeddings than this is searched through an inverted-file index
SCAN_ROWS = 16_384  # embeddings an indexed query compares: what an exact search of a 16k-feature SAE does


@dataclass
class RunEmbeddings:
    """One run's explanation embeddings, searchable by cosine similarity: exactly (a matrix product)
    up to EXACT_MAX, above it through faiss's inverted-file index (sqrt(n) k-means lists, as many of the
    nearest lists scanned as hold about SCAN_ROWS embeddings), so that a query costs about the same at a
    million explanations as at 16k. The price is recall: 0.999 of the exact top 50 at 1M on clustered
    vectors (bench/semantic_index.py); the nearest lists are where similar explanations gather."""

    keys: list[tuple[int, str]]  # (feature_index, method) of each row
    matrix: np.ndarray | None  # exact search: [n, DIM] float32 unit vectors
    ivf: object | None = None  # faiss.IndexIVFFlat over the same vectors (then matrix is None)

    def nearest(self, query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(row, cosine) of the k nearest rows, best first."""
        k = min(k, len(self.keys))
        if k == 0:
            return []
        if self.ivf is not None:
            scores, rows = self.ivf.search(np.asarray(query_vector, dtype=np.float32)[None, :], k)  # type: ignore[attr-defined]
            return [(int(r), float(v)) for r, v in zip(rows[0], scores[0]) if r >= 0]
        assert self.matrix is not None
        sims = self.matrix @ query_vector
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(int(i), float(sims[i])) for i in top]


def build_ivf(matrix: np.ndarray, seed: int = 0) -> faiss.IndexIVFFlat:
    """faiss IndexIVFFlat (inner product, i.e. cosine on unit vectors) over `matrix`: sqrt(n) lists
    trained by k-means on 64 samples per list, all rows added; about 25 s for 1M explanations on 2 cores,
    once per server process and run revision."""
    import faiss

    n, dim = matrix.shape
    n_lists = max(1, int(math.sqrt(n)))
    sample = matrix[np.random.default_rng(seed).choice(n, size=min(n, 64 * n_lists), replace=False)]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, n_lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(sample)
    index.add(matrix)
    index.nprobe = min(n_lists, max(1, math.ceil(SCAN_ROWS * n_lists / n)))
    faiss.omp_set_num_threads(1)  # queries are one vector each: a page worker's thread, not every core
    return index


class EmbeddingIndex:
    """Per (store, run, SAE revision) the run's RunEmbeddings, loaded (and indexed) once per process."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, RunEmbeddings] = {}
        self._lock = threading.Lock()

    def get(self, conn: Connection, run_id: int) -> RunEmbeddings:
        revision = conn.scalar(select(SAE.revision).where(SAE.active_run_id == run_id))
        key = (str(conn.engine.url), run_id, revision)
        if key not in self._by_key:
            with self._lock:
                if key not in self._by_key:
                    rows = conn.execute(
                        select(Explanation.feature_index, Explanation.method, Explanation.embedding)
                        .where(Explanation.run_id == run_id, Explanation.embedding.is_not(None))
                        .order_by(Explanation.feature_index, Explanation.method)
                    ).all()
                    matrix = unpack_embeddings([r[2] or b"" for r in rows]) if rows else np.zeros((0, 1), dtype=np.float32)
                    keys = [(r[0], r[1]) for r in rows]
                    del rows
                    for old in [k for k in self._by_key if k[:2] == key[:2]]:  # an older revision of the run
                        del self._by_key[old]
                    if len(keys) > EXACT_MAX:
                        self._by_key[key] = RunEmbeddings(keys, None, build_ivf(matrix))
                    else:
                        self._by_key[key] = RunEmbeddings(keys, matrix)
        return self._by_key[key]


EMBEDDINGS = EmbeddingIndex()


def semantic(conn: Connection, run_id: int, query_vector: np.ndarray, limit: int = 50) -> list[Match]:
    """Explanations of run `run_id` nearest to `query_vector` (unit norm) by cosine similarity."""
    run = EMBEDDINGS.get(conn, run_id)
    return [Match(run.keys[i][0], run.keys[i][1], score) for i, score in run.nearest(query_vector, limit)]


def fuse(*rankings: list[Match], limit: int = 50) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of several rankings into (feature_index, fused score), best first; a feature
    counts once per ranking (its best explanation there)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        seen: set[int] = set()
        for m in ranking:
            if m.feature_index in seen:
                continue
            seen.add(m.feature_index)
            scores[m.feature_index] = scores.get(m.feature_index, 0.0) + 1.0 / (RRF_K + len(seen))
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


_TEXTS = select(Explanation.feature_index, Explanation.method, Explanation.text, Explanation.score).where(
    Explanation.run_id == bindparam("run_id"), Explanation.feature_index.in_(bindparam("indices", expanding=True))
)


def explanation_texts(conn: Connection, run_id: int, indices: list[int]) -> dict[int, list[tuple[str, str, float | None]]]:
    """(method, text, score) of each feature's explanations, for showing hits."""
    out: dict[int, list[tuple[str, str, float | None]]] = {}
    if indices:
        for i, method, txt, score in conn.execute(_TEXTS, {"run_id": run_id, "indices": indices}):
            out.setdefault(i, []).append((method, txt, score))
    return out
