"""The store's tables (SQLAlchemy 2.0). The Alembic chain in `migrations/` creates exactly these.

    models ─< vocab            one row per token of a model's vocabulary: token strings live here once,
                               examples keep only token ids
    models ─< saes ─< mining_runs ─< features ─< examples
                                    ├─< token_features   search index: peak tokens of top contexts
                                    ├── run_weights      the SAE weights the run was mined with
                                    ├─< feature_order    checkpoints of the sorted feature table
                                    ├─< explanations     per feature and method (N2G, LLM), scored
                                    ├── feature_maps ─< feature_map_points   2-D map of alive features
                                    └─< feature_relations  families across widths, matches across seeds
    attribution_graphs         pruned attribution graphs of prompts (`saescope trace`), by permalink slug
    sweeps                     finished strength sweeps (sae_core/live/sweep.py), by their request's digest
                 └── active_run_id: the run readers see. A run becomes visible only when complete, by
                     switching this pointer in one transaction, so pages are never empty or mixed.

Examples keep their tokens and per-token activations as packed little-endian arrays (int32 ids,
float16 activations): 6 bytes per token instead of a row per token; `codec.py` is their one encoding.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .codec import pack_acts, pack_ids, unpack_acts, unpack_ids  # noqa: F401  (re-exported with the tables)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    d_model: Mapped[int]
    n_layers: Mapped[int]
    vocab_size: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Vocab(Base):
    __tablename__ = "vocab"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)


class SAE(Base):
    __tablename__ = "saes"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # the URL slug: /saes/{name}
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    hook: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(32))
    d_in: Mapped[int]
    n_latents: Mapped[int]
    k: Mapped[int | None]
    path: Mapped[str] = mapped_column(Text)  # the SAE folder it was mined from
    train_config: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # eval.json, when the SAE was evaluated
    active_run_id: Mapped[int | None] = mapped_column(ForeignKey("mining_runs.id", use_alter=True, ondelete="SET NULL"))
    # Bumped by every write that changes what this SAE's pages show (a run switch, explanations, metrics):
    # ETags and the server's cache of rendered pages follow it (store/changes.py).
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MiningRun(Base):
    __tablename__ = "mining_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="writing")  # writing -> complete
    corpus: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int]  # activation positions mined
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Feature(Base):
    __tablename__ = "features"
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column("feature_index", Integer, primary_key=True)
    n_fired: Mapped[int]  # positions where the feature is non-zero
    density: Mapped[float] = mapped_column(Float)  # n_fired / positions mined
    max_act: Mapped[float] = mapped_column(Float)
    mean_act: Mapped[float] = mapped_column(Float)  # mean over the positions where it fires
    histogram: Mapped[dict] = mapped_column(JSON)  # {"edges": [51 floats], "counts": [50 ints]}
    intervals: Mapped[dict] = mapped_column(JSON)  # {"edges": [11 floats], "shares": [10 floats]}
    logits: Mapped[dict] = mapped_column(JSON)  # {"top": [[token_id, value]...], "bottom": [...]}
    # [[feature_index, decoder cosine, that feature's top_token_id], ...]: the page names each neighbour's
    # strongest token without a second query (a run never changes, so the copy cannot go stale)
    neighbours: Mapped[list] = mapped_column(JSON)
    explanation: Mapped[str | None] = mapped_column(Text)
    top_token_id: Mapped[int | None]  # the token its strongest top context peaks on; None: never fired
    # [[partner index, co-fired positions, P(partner | this), Jaccard, partner's top_token_id], ...] strongest
    # first (sae_core/coactivation.py); None for a run mined without co-activation
    coactivation: Mapped[list | None] = mapped_column(JSON)

    # With the index as tie-break, a sorted page is one range of an index (store/order.py starts it)
    __table_args__ = (
        Index("ix_features_run_density", "run_id", "density", "feature_index"),
        Index("ix_features_run_max", "run_id", "max_act", "feature_index"),
    )


class Example(Base):
    __tablename__ = "examples"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"))
    feature_index: Mapped[int]
    kind: Mapped[str] = mapped_column(String(8))  # "top" or "interval"
    interval: Mapped[int | None]  # 0..9 for interval samples, lowest first
    rank: Mapped[int]  # order within (kind, interval)
    doc_id: Mapped[str] = mapped_column(Text)
    doc_offset: Mapped[int]  # token offset of the max token in its document
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian
    acts: Mapped[bytes] = mapped_column(LargeBinary)  # float16 little-endian, this feature's activation per token
    max_act: Mapped[float] = mapped_column(Float)
    max_pos: Mapped[int]  # index of the max token within token_ids

    __table_args__ = (Index("ix_examples_lookup", "run_id", "feature_index", "kind", "interval", "rank"),)


class TokenFeature(Base):
    """Search index: which features' top contexts peak on which token (one row per distinct peak token)."""

    __tablename__ = "token_features"
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_examples: Mapped[int]  # top contexts of the feature whose max sits on this token
    max_act: Mapped[float] = mapped_column(Float)


class FeatureOrder(Base):
    """Checkpoints of a run's feature table in each sort order and filter (store/order.py): every
    128th position's sort value and feature index, and the filtered table's length, so that any page,
    the last included, is an index lookup and a short walk instead of an OFFSET scan and a count."""

    __tablename__ = "feature_order"
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"), primary_key=True)
    sort: Mapped[str] = mapped_column(String(16), primary_key=True)  # index | density | max_act
    filter: Mapped[str] = mapped_column(String(8), primary_key=True)  # all | alive | dead | rare
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # in ascending order (value, then index)
    feature_index: Mapped[int]  # -1: the filtered table is empty
    value: Mapped[float] = mapped_column(Float)
    total: Mapped[int]  # rows of the filtered table


class RunWeights(Base):
    """The SAE weights (a safetensors file, as `interchange` writes it) a run was mined with. Kept in the
    store so that a server without the training machine's disk (docker-compose's app container) can run
    the SAE live; deleted with its run, so the live SAE is always the one the pages describe."""

    __tablename__ = "run_weights"
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"), primary_key=True)
    format: Mapped[str] = mapped_column(String(32))  # "safetensors"
    sha256: Mapped[str] = mapped_column(String(64))
    n_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


EXPLANATION_DIM = 384  # all-MiniLM-L6-v2 sentence embeddings (sae_core/explain/embed.py)


class Explanation(Base):
    """One explanation of one feature of a mining run, by one method ("n2g", "llm"); a feature holds one
    per method. `score` is the method's single number to sort by (N2G: F1 of held-out precision and
    recall; LLM: mean of detection and fuzzing), `scores` the rest. `search_text` is what full-text and
    semantic search read (store/explanation_search.py): on SQLite an FTS5 table kept in step by triggers, on
    PostgreSQL a GIN index over its tsvector; `embedding` its sentence embedding (float16)."""

    __tablename__ = "explanations"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"))
    feature_index: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)  # one line, as a reader sees it
    patterns: Mapped[list] = mapped_column(JSON, default=list)  # N2G: [{"tokens": [id | null, ...], "n": .., "fired": ..}]
    precision: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict] = mapped_column(JSON, default=dict)
    search_text: Mapped[str] = mapped_column(Text)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("run_id", "feature_index", "method", name="uq_explanations_feature_method"),
        Index("ix_explanations_run_method_score", "run_id", "method", "score"),
        Index(
            "ix_explanations_fts",
            func.to_tsvector(literal_column("'english'"), literal_column("search_text")),
            postgresql_using="gin",
        ).ddl_if(dialect="postgresql"),
    )


class FeatureMap(Base):
    """How a run's map was made (sae_core/relations/map.py): a 2-D UMAP of its alive features' decoder
    rows (cosine) with a fixed seed, clustered; the run's points are in feature_map_points."""

    __tablename__ = "feature_maps"
    run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"), primary_key=True)
    seed: Mapped[int]
    n_points: Mapped[int]  # alive features mapped
    n_clusters: Mapped[int]
    config: Mapped[dict] = mapped_column(JSON, default=dict)  # UMAP and clustering parameters
    seconds: Mapped[float] = mapped_column(Float)  # how long the map took to compute
    # {"x": [lo, hi], "y": [lo, hi], "size": n, "counts": [n*n ints, row-major from the top-left]}: a
    # coarse picture of the map for the feature page's inset
    grid: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FeatureMapPoint(Base):
    """One alive feature's place on its run's map, its cluster (-1: in no cluster) and its nearest
    features on the map (stored with the map, so the feature page needs no spatial query)."""

    __tablename__ = "feature_map_points"
    run_id: Mapped[int] = mapped_column(ForeignKey("feature_maps.run_id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column("feature_index", Integer, primary_key=True)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    cluster: Mapped[int]
    neighbours: Mapped[list] = mapped_column(JSON)  # [[feature_index, map distance], ...] nearest first


class FeatureRelation(Base):
    """One feature of one run related to a feature of another run of the same model and hook
    (sae_core/relations/families.py). kind "split": the source is a parent in a narrower SAE, the target
    one of the finer features it splits into in a wider SAE; kind "match": the same feature in an SAE of
    the same width (another seed), stored in both directions. `cosine` is their decoder cosine;
    `coactivation` how often the source fires where the target fires, on a shared sample of tokens
    (P(source | target)); `co_fired` the positions where both fired. Deleted with either run."""

    __tablename__ = "feature_relations"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    source_run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"))
    source_feature: Mapped[int] = mapped_column(Integer)
    target_run_id: Mapped[int] = mapped_column(ForeignKey("mining_runs.id", ondelete="CASCADE"))
    target_feature: Mapped[int] = mapped_column(Integer)
    cosine: Mapped[float] = mapped_column(Float)
    coactivation: Mapped[float] = mapped_column(Float)
    co_fired: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_feature_relations_source", "source_run_id", "source_feature"),
        Index("ix_feature_relations_target", "target_run_id", "target_feature"),
    )


class SAEBenchmark(Base):
    """One run of the SAE benchmark suite (`saescope bench-sae`, sae_core/evaluation/) on one SAE with one
    seed. `results` holds the flat {metric name: number} the SAE page and /compare read (names in
    sae_core/evaluation/result.py, e.g. "l0", "fvu", "sparse_probing_top1_accuracy", "absorption_fraction")
    plus nested details under keys that are not metric names ("details", "absorption_valid");
    `saebench` the same results as SAEBench BaseEvalOutput dicts (one per eval type); `config` the suite's
    settings. Re-running a seed replaces its row; deleted with the SAE."""

    __tablename__ = "sae_benchmarks"
    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    suite_version: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    results: Mapped[dict] = mapped_column(JSON, default=dict)
    saebench: Mapped[list] = mapped_column(JSON, default=list)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("sae_id", "seed", name="uq_sae_benchmarks_sae_seed"),)


class AttributionGraphRecord(Base):
    """One prompt's pruned attribution graph (`saescope trace`, sae_core/circuits/trace.py), found by its
    permalink `slug`: a short hash of the prompt, the transcoder set's identity (a digest of every layer's
    weights), the thresholds and the attribution settings, so tracing the same thing again finds this row.
    `graph` is the pruned graph as zlib-compressed JSON (sae_core/store/graphs.py: kept nodes and edges
    only; the unpruned matrix is quadratic in the nodes). The transcoder layers link to feature pages
    through `layer_folders`: a mined transcoder's `saes.path` is its folder. Not tied to a mining run: a
    graph outlives re-mines of its transcoders."""

    __tablename__ = "attribution_graphs"
    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(32), unique=True)
    prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(512))  # the model the transcoders were trained on
    transcoders: Mapped[str] = mapped_column(String(64))  # the transcoder set's identity (sha256 of its weights)
    transcoders_path: Mapped[str] = mapped_column(Text)  # the `saescope train --transcoders` folder
    layer_folders: Mapped[dict] = mapped_column(JSON, default=dict)  # {"layer": resolved folder}
    config: Mapped[dict] = mapped_column(JSON, default=dict)  # thresholds and attribution settings
    n_tokens: Mapped[int]
    nodes_before: Mapped[int]
    edges_before: Mapped[int]
    nodes_after: Mapped[int]
    edges_after: Mapped[int]
    replacement_score: Mapped[float] = mapped_column(Float)  # of the unpruned graph (Ameisen et al. 2025)
    completeness_score: Mapped[float] = mapped_column(Float)
    scores: Mapped[dict] = mapped_column(JSON, default=dict)  # the same for the pruned graph, and the timings
    seconds: Mapped[float] = mapped_column(Float)  # wall time of the build (load, attribution, pruning)
    graph: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SweepRecord(Base):
    """One finished strength sweep (sae_core/live/sweep.py; sae_core/store/sweeps.py writes and reads it),
    found by `key`: SweepRequest.key(), the digest of the canonical request, which the sweep's permalink
    carries in its query. One row per key and mining run: a re-mine changes the SAE's weights, so the same
    request on the new run is a new sweep; the old row stays, so an old permalink still shows what it
    showed. `sae` is the SAE's name (not a foreign key: a stored sweep is a record of what was computed,
    and outlives the runs). `result` is the SweepResult as zlib-compressed JSON (Python's encoder, which
    keeps a NaN lift; PostgreSQL's json type refuses NaN)."""

    __tablename__ = "sweeps"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    sae: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[int] = mapped_column(Integer)  # the mining run whose SAE weights answered
    request: Mapped[dict] = mapped_column(JSON, default=dict)  # SweepRequest.canonical()
    result: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)  # when the sweep finished

    __table_args__ = (UniqueConstraint("key", "run_id", name="uq_sweeps_key_run"),)


__all__ = [
    "Base",
    "Model",
    "Vocab",
    "SAE",
    "MiningRun",
    "Feature",
    "Example",
    "TokenFeature",
    "RunWeights",
    "FeatureOrder",
    "Explanation",
    "FeatureMap",
    "FeatureMapPoint",
    "FeatureRelation",
    "SAEBenchmark",
    "AttributionGraphRecord",
    "SweepRecord",
    "pack_ids",
    "unpack_ids",
    "pack_acts",
    "unpack_acts",
]
