"""Publish a mining run: rows are written under a run that readers cannot see, then one transaction
marks it complete, points the SAE at it and deletes the SAE's previous runs. A crash before that
switch leaves an invisible 'writing' run, removed by the next `mine` of the same SAE."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

from .changes import mark_changed
from .codec import pack_acts, pack_ids
from .order import checkpoint_rows
from .schema import SAE, Example, Feature, FeatureOrder, MiningRun, Model, TokenFeature, Vocab, utcnow
from .weights import store_weights

if TYPE_CHECKING:
    from ..feature_stats import FeatureTables

BATCH = 5000  # rows per executemany


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


def find_complete_run(engine: Engine, sae_name: str, run_config: dict) -> int | None:
    """The id of the SAE's visible run when it was mined with exactly `run_config`."""
    with Session(engine) as s:
        row = s.execute(
            select(MiningRun.id, MiningRun.config).join(SAE, SAE.active_run_id == MiningRun.id).where(SAE.name == sae_name)
        ).first()
    return row.id if row is not None and row.config == run_config else None


def token_strings(tokenizer, vocab_size: int) -> list[str]:
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


def _features(run_id: int, t, logits: LogitEffects, neighbours: Neighbours):
    top_ids, top_vals, bot_ids, bot_vals = logits.top_ids, logits.top_values, logits.bottom_ids, logits.bottom_values
    nb_ids, nb_sims = neighbours.ids, neighbours.cosines
    n, bins = t.hist_counts.shape
    for i in range(n):
        fired = int(t.n_fired[i])
        lo, hi = float(t.act_min[i]), float(t.act_max[i])
        yield {
            "run_id": run_id,
            "feature_index": i,
            "n_fired": fired,
            "density": fired / max(t.positions, 1),
            "max_act": hi,
            "mean_act": float(t.act_sum[i] / fired) if fired else 0.0,
            "histogram": {"edges": np.linspace(lo, hi, bins + 1).round(5).tolist(), "counts": t.hist_counts[i].tolist()},
            "intervals": {
                "edges": np.linspace(0, hi, t.interval_counts.shape[1] + 1).round(5).tolist(),
                "shares": (t.interval_counts[i] / max(fired, 1)).round(6).tolist(),
            },
            "logits": {
                "top": [[int(a), round(float(b), 4)] for a, b in zip(top_ids[i], top_vals[i])],
                "bottom": [[int(a), round(float(b), 4)] for a, b in zip(bot_ids[i], bot_vals[i])],
            },
            "neighbours": [[int(a), round(float(b), 4)] for a, b in zip(nb_ids[i], nb_sims[i])],
            "explanation": None,
        }


def _examples(run_id: int, t, doc_ids: list[str]):
    for e in range(len(t.ex_feature)):
        top = t.ex_kind[e] == 0
        yield {
            "run_id": run_id,
            "feature_index": int(t.ex_feature[e]),
            "kind": "top" if top else "interval",
            "interval": None if top else int(t.ex_interval[e]),
            "rank": int(t.ex_rank[e]),
            "doc_id": doc_ids[int(t.ex_doc_index[e])],
            "doc_offset": int(t.ex_doc_offset[e]),
            "token_ids": pack_ids(t.ex_tokens[e]),
            "acts": pack_acts(t.ex_acts[e]),
            "max_act": float(t.ex_max_act[e]),
            "max_pos": int(t.ex_max_pos[e]),
        }


def _token_features(run_id: int, t):
    """Search index rows: for each feature, the tokens its top contexts peak on."""
    agg: dict[tuple[int, int], list] = defaultdict(lambda: [0, 0.0])
    tops = np.nonzero(t.ex_kind == 0)[0]
    peak_tokens = t.ex_tokens[tops, t.ex_max_pos[tops]]
    for e, tok in zip(tops, peak_tokens):
        a = agg[(int(tok), int(t.ex_feature[e]))]
        a[0] += 1
        a[1] = max(a[1], float(t.ex_max_act[e]))
    for (tok, feat), (count, mx) in agg.items():
        yield {"run_id": run_id, "token_id": tok, "feature_index": feat, "n_examples": count, "max_act": mx}


def _insert_all(s: Session, model, rows, total: int, desc: str, progress: bool) -> None:
    """Core executemany on the table (the ORM's bulk path costs ~2x more per row)."""
    table = model.__table__
    bar = tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not progress, dynamic_ncols=True)
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            s.execute(insert(table), batch)
            bar.update(len(batch))
            batch = []
    if batch:
        s.execute(insert(table), batch)
        bar.update(len(batch))
    bar.close()


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
        _insert_all(s, Feature, _features(run_id, tables, run.logits, run.neighbours), len(tables.n_fired), "storing features", progress)
        _insert_all(s, Example, _examples(run_id, tables, run.doc_ids), len(tables.ex_feature), "storing examples", progress)
        _insert_all(s, TokenFeature, _token_features(run_id, tables), 0, "storing search index", False)
        density = tables.n_fired / max(tables.positions, 1)  # as _features stores it
        _insert_all(s, FeatureOrder, checkpoint_rows(run_id, density, tables.act_max), 0, "storing table order", False)
        if run.weights is not None:
            store_weights(s, run_id, run.weights)
    with Session(engine) as s, s.begin():  # the switch: readers see the old run or the new one, never a mix
        s.execute(update(MiningRun).where(MiningRun.id == run_id).values(status="complete", finished_at=utcnow()))
        s.execute(update(SAE).where(SAE.id == sae_id).values(active_run_id=run_id))
        mark_changed(s, sae_id)  # every page of the SAE switches, servers' caches included
        s.execute(delete(MiningRun).where(MiningRun.sae_id == sae_id, MiningRun.id != run_id))
    _analyze(engine)
    return run_id


def _analyze(engine: Engine) -> None:
    """Refresh the planner's statistics after a bulk load. Without them PostgreSQL chose to scan every
    top example of the run for a feature's peak token (27 ms instead of 0.1 ms per page) until autovacuum
    came round; SQLite's planner uses them too."""
    with engine.connect() as conn:
        for table in (Feature, Example, TokenFeature, FeatureOrder):
            conn.execute(text(f"ANALYZE {table.__tablename__}"))
        conn.commit()
