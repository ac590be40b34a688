"""Publish a mining run: rows are written under a run that readers cannot see, then one transaction
marks it complete, points the SAE at it and deletes the SAE's previous runs. A crash before that
switch leaves an invisible 'writing' run, removed by the next `mine` of the same SAE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import codec, order
from .bulk import BATCH, load_rows
from .changes import mark_changed
from .schema import SAE, Example, Feature, FeatureOrder, FeatureRelation, MiningRun, Model, TokenFeature, Vocab, utcnow
from .weights import store_weights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..coactivation import Coactivation
    from ..feature_stats import FeatureTables


@dataclass
class ModelRecord:
    """The model a run belongs to, as the store keeps it (no model internals past this point)."""

    name: str
    d_model: int
    n_layers: int
    vocab_size: int
    token_strings: Callable[[], list[str]]  # each token decoded on its own; called only if the store lacks them


@dataclass
class SAERecord:
    name: str  # URL slug
    hook: str
    architecture: str
    d_in: int
    n_latents: int
    k: int | None
    path: str  # the SAE's folder
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # eval.json


@dataclass
class LogitEffects:
    """Per feature, the tokens W_dec[i] @ W_U promotes and suppresses most: arrays [n_latents, n_top]."""

    top_ids: np.ndarray
    top_values: np.ndarray
    bottom_ids: np.ndarray
    bottom_values: np.ndarray


@dataclass
class Neighbours:
    """Per feature, the nearest features by decoder cosine: arrays [n_latents, n_neighbours]."""

    ids: np.ndarray
    cosines: np.ndarray


@dataclass
class MinedRun:
    """Everything one mining run stores: what `write_run` publishes."""

    model: ModelRecord
    sae: SAERecord
    corpus: str
    config: dict  # the run's identity: a re-mine with the same config is skipped
    tables: FeatureTables  # statistics and examples
    logits: LogitEffects
    neighbours: Neighbours
    doc_ids: list[str]  # what the examples' doc_index values index
    weights: bytes | None = None  # the SAE as interchange.sae_bytes writes it: what the live features run (store/weights.py)
    coactivation: Coactivation | None = None  # each feature's top co-firing features (sae_core/coactivation.py)


def find_complete_run(engine: Engine, sae_name: str, run_config: dict) -> int | None:
    """The id of the SAE's visible run when it was mined with exactly `run_config`."""
    with Session(engine) as s:
        row = s.execute(
            select(MiningRun.id, MiningRun.config).join(SAE, SAE.active_run_id == MiningRun.id).where(SAE.name == sae_name)
        ).first()
    return row.id if row is not None and row.config == run_config else None


def token_strings(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str]:
    """Each token id decoded on its own: what a reader sees for that token in a context. NUL becomes
    U+2400 (PostgreSQL text cannot hold it, and it must be shown visibly anyway)."""
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], clean_up_tokenization_spaces=False)
    return [t.replace("\x00", "\u2400") for t in texts]


def _ensure_model(s: Session, m: ModelRecord) -> int:
    model = s.scalar(select(Model).where(Model.name == m.name))
    if model is None:
        model = Model(name=m.name, d_model=m.d_model, n_layers=m.n_layers, vocab_size=m.vocab_size)
        s.add(model)
        s.flush()
    if s.scalar(select(Vocab.token_id).where(Vocab.model_id == model.id).limit(1)) is None:
        texts = m.token_strings()
        for start in range(0, m.vocab_size, BATCH):
            s.execute(
                insert(Vocab),
                [{"model_id": model.id, "token_id": i, "text": texts[i]} for i in range(start, min(start + BATCH, m.vocab_size))],
            )
    return model.id


FEATURE_COLUMNS = (
    "run_id", "feature_index", "n_fired", "density", "max_act", "mean_act",
    "histogram", "intervals", "logits", "neighbours", "top_token_id", "coactivation",
)  # fmt: skip
EXAMPLE_COLUMNS = ("run_id", "feature_index", "kind", "interval", "rank", "doc_id", "doc_offset", "token_ids", "acts", "max_act", "max_pos")
TOKEN_FEATURE_COLUMNS = ("run_id", "token_id", "feature_index", "n_examples", "max_act")


def _pairs(ids: np.ndarray, values: np.ndarray) -> list[str]:
    """Per row, the JSON text of [[id, value], ...], values rounded to 4 decimals by Python's round."""
    return [json.dumps([[int(a), round(b, 4)] for a, b in zip(i, v)]) for i, v in zip(ids.tolist(), values.astype(np.float64).tolist())]


def top_token_ids(t: FeatureTables) -> list[int | None]:
    """Per feature, the token its strongest top context (rank 0) peaks on; None for a feature that
    never fired. What features.top_token_id stores, for the pages and the table."""
    out: list[int | None] = [None] * len(t.n_fired)
    first = np.nonzero((t.ex_kind == 0) & (t.ex_rank == 0))[0]
    peaks = t.ex_tokens[first, t.ex_max_pos[first]].tolist() if len(first) else []
    for feature, token in zip(t.ex_feature[first].tolist(), peaks):
        out[feature] = int(token)
    return out


def neighbour_rows(ids: np.ndarray, cosines: np.ndarray, top_tokens: list[int | None]) -> list[str]:
    """Per row, the JSON text of [[index, cosine, its top token id], ...] (cosines rounded as _pairs)."""
    return [
        json.dumps([[int(a), round(b, 4), top_tokens[a]] for a, b in zip(i, v)])
        for i, v in zip(ids.tolist(), cosines.astype(np.float64).tolist())
    ]


def coactivation_rows(c: Coactivation, top_tokens: list[int | None], features: range) -> list[str]:
    """Per feature, the JSON text of [[partner, count, P(partner | feature), Jaccard, partner's top token], ...]."""
    return [json.dumps([[p, n, round(pg, 4), round(j, 4), top_tokens[p]] for p, n, pg, j in c.rows(i)]) for i in features]


def _features(
    run_id: int, t: FeatureTables, logits: LogitEffects, neighbours: Neighbours, coactivation: Coactivation | None = None
) -> Iterator[tuple[int, int, int, float, float, float, str, str, str, str, int | None, str | None]]:
    """Feature rows in FEATURE_COLUMNS order, the JSON columns encoded here a batch at a time (the
    vectorised np.linspace computes exactly what it computes per row)."""
    n, bins = t.hist_counts.shape
    n_iv = t.interval_counts.shape[1]
    top_tokens = top_token_ids(t)
    for start in range(0, n, BATCH):
        sl = slice(start, min(start + BATCH, n))
        fired, lo, hi = t.n_fired[sl], t.act_min[sl].astype(np.float64), t.act_max[sl].astype(np.float64)
        hist_edges = np.linspace(lo, hi, bins + 1, axis=1).round(5).tolist()
        iv_edges = np.linspace(np.zeros_like(hi), hi, n_iv + 1, axis=1).round(5).tolist()
        shares = (t.interval_counts[sl] / np.maximum(fired, 1)[:, None]).round(6).tolist()
        top = _pairs(logits.top_ids[sl], logits.top_values[sl])
        bottom = _pairs(logits.bottom_ids[sl], logits.bottom_values[sl])
        near = neighbour_rows(neighbours.ids[sl], neighbours.cosines[sl], top_tokens)
        rows = range(sl.start, sl.stop)
        coact = coactivation_rows(coactivation, top_tokens, rows) if coactivation is not None else [None] * len(rows)
        counts = t.hist_counts[sl].tolist()
        for j, (f, mx, total) in enumerate(zip(fired.tolist(), hi.tolist(), t.act_sum[sl].tolist())):
            yield (
                run_id,
                start + j,
                f,
                f / max(t.positions, 1),
                mx,
                total / f if f else 0.0,
                json.dumps({"edges": hist_edges[j], "counts": counts[j]}),
                json.dumps({"edges": iv_edges[j], "shares": shares[j]}),
                f'{{"top": {top[j]}, "bottom": {bottom[j]}}}',
                near[j],
                top_tokens[start + j],
                coact[j],
            )


def _examples(
    run_id: int, t: FeatureTables, doc_ids: list[str]
) -> Iterator[tuple[int, int, str, int | None, int, str, int, bytes, bytes, float, int]]:
    """Example rows in EXAMPLE_COLUMNS order; tokens and activations packed by store/codec.py."""
    for start in range(0, len(t.ex_feature), BATCH):
        sl = slice(start, start + BATCH)
        ids, acts = codec.pack_rows(t.ex_tokens[sl], t.ex_acts[sl])
        top = (t.ex_kind[sl] == 0).tolist()
        cols = zip(
            t.ex_feature[sl].tolist(), top, t.ex_interval[sl].tolist(), t.ex_rank[sl].tolist(), t.ex_doc_index[sl].tolist(),
            t.ex_doc_offset[sl].tolist(), ids, acts, t.ex_max_act[sl].tolist(), t.ex_max_pos[sl].tolist(),
        )  # fmt: skip
        for feature, is_top, interval, rank, doc, offset, tok, act, mx, pos in cols:
            yield (
                run_id,
                feature,
                "top" if is_top else "interval",
                None if is_top else interval,
                rank,
                doc_ids[doc],
                offset,
                tok,
                act,
                mx,
                pos,
            )


def _token_features(run_id: int, t: FeatureTables) -> Iterator[tuple[int, int, int, int, float]]:
    """Search index rows (TOKEN_FEATURE_COLUMNS): for each feature, the tokens its top contexts peak on."""
    tops = np.nonzero(t.ex_kind == 0)[0]
    if len(tops) == 0:
        return
    peak = t.ex_tokens[tops, t.ex_max_pos[tops]].astype(np.int64)
    feature, act = t.ex_feature[tops].astype(np.int64), t.ex_max_act[tops].astype(np.float64)
    pairs, inverse, counts = np.unique(np.stack([peak, feature], axis=1), axis=0, return_inverse=True, return_counts=True)
    best = np.full(len(pairs), -np.inf)
    np.maximum.at(best, inverse.reshape(-1), act)
    for (tok, feat), count, mx in zip(pairs.tolist(), counts.tolist(), best.tolist()):
        yield (run_id, tok, feat, count, mx)


def write_run(engine: Engine, run: MinedRun, progress: bool = True) -> int:
    """Insert a complete mining run and make it the SAE's visible one; returns the run id."""
    tables, record = run.tables, dict(vars(run.sae))
    with Session(engine) as s, s.begin():
        model_id = _ensure_model(s, run.model)
        sae = s.scalar(select(SAE).where(SAE.name == record["name"]))
        if sae is None:
            sae = SAE(model_id=model_id, **record)
            s.add(sae)
        else:
            for key, value in record.items():
                setattr(sae, key, value)
            sae.model_id = model_id
        s.flush()
        s.execute(delete(MiningRun).where(MiningRun.sae_id == sae.id, MiningRun.status != "complete"))  # a crashed write
        mining_run = MiningRun(sae_id=sae.id, status="writing", corpus=run.corpus, tokens=int(tables.positions), config=run.config)
        s.add(mining_run)
        s.flush()
        sae_id, run_id = sae.id, mining_run.id
    with Session(engine) as s, s.begin():
        features = _features(run_id, tables, run.logits, run.neighbours, run.coactivation)
        load_rows(s, Feature, FEATURE_COLUMNS, features, len(tables.n_fired), "storing features", progress)
        examples = _examples(run_id, tables, run.doc_ids)
        load_rows(s, Example, EXAMPLE_COLUMNS, examples, len(tables.ex_feature), "storing examples", progress)
        load_rows(s, TokenFeature, TOKEN_FEATURE_COLUMNS, _token_features(run_id, tables))
        density = tables.n_fired / max(tables.positions, 1)  # as _features stores it
        load_rows(s, FeatureOrder, order.COLUMNS, order.checkpoint_rows(run_id, density, tables.act_max))
        if run.weights is not None:
            store_weights(s, run_id, run.weights)
    with Session(engine) as s, s.begin():  # the switch: readers see the old run or the new one, never a mix
        s.execute(update(MiningRun).where(MiningRun.id == run_id).values(status="complete", finished_at=utcnow()))
        s.execute(update(SAE).where(SAE.id == sae_id).values(active_run_id=run_id))
        mark_changed(s, sae_id)  # every page of the SAE switches, servers' caches included
        _mark_relatives_changed(s, sae_id, run_id)  # their links to the old run's features go with it
        s.execute(delete(MiningRun).where(MiningRun.sae_id == sae_id, MiningRun.id != run_id))
    _analyze(engine)
    return run_id


def _mark_relatives_changed(s: Session, sae_id: int, new_run_id: int) -> None:
    """Mark changed every other SAE whose live run has family relations (feature_relations) with this SAE's
    runs about to be deleted: the delete cascades to those relations, so their pages change too."""
    old = select(MiningRun.id).where(MiningRun.sae_id == sae_id, MiningRun.id != new_run_id)
    R = FeatureRelation
    linked = select(R.target_run_id).where(R.source_run_id.in_(old)).union(select(R.source_run_id).where(R.target_run_id.in_(old)))
    for other in s.scalars(select(SAE.id).where(SAE.active_run_id.in_(linked), SAE.id != sae_id)).all():
        mark_changed(s, other)


def _analyze(engine: Engine) -> None:
    """Refresh the planner's statistics after a bulk load. Without them PostgreSQL chose to scan every
    top example of the run for a feature's peak token (27 ms instead of 0.1 ms per page) until autovacuum
    came round; SQLite's planner uses them too."""
    with engine.connect() as conn:
        for table in (Feature, Example, TokenFeature, FeatureOrder):
            conn.execute(text(f"ANALYZE {table.__tablename__}"))
        conn.commit()
