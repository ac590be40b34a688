"""Reading features' mined contexts out of the store in batches, decoded into arrays for the explainers
(one query and one numpy pass per batch: a 16k-latent SAE holds ~1.3M example rows)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from sqlalchemy import Connection, select

from ..store.codec import ACT_DTYPE, ID_DTYPE
from ..store.schema import Example, Feature
from .base import FeatureContexts


def read_contexts(conn: Connection, run_id: int, indices: list[int]) -> list[FeatureContexts]:
    """The contexts of features `indices` of run `run_id` (features with no examples are left out)."""
    if not indices:
        return []
    max_act = dict(conn.execute(select(Feature.index, Feature.max_act).where(Feature.run_id == run_id, Feature.index.in_(indices))).all())
    rows = conn.execute(
        select(Example.feature_index, Example.kind, Example.interval, Example.rank, Example.token_ids, Example.acts)
        .where(Example.run_id == run_id, Example.feature_index.in_(indices))
        .order_by(Example.feature_index, Example.kind, Example.interval, Example.rank)
    ).all()
    lengths = np.array([len(r.acts) // ACT_DTYPE.itemsize for r in rows], dtype=np.int64)
    ids = np.frombuffer(b"".join(r.token_ids for r in rows), dtype=ID_DTYPE).astype(np.int64)
    acts = np.frombuffer(b"".join(r.acts for r in rows), dtype=ACT_DTYPE).astype(np.float32)
    ends = np.cumsum(lengths)
    by_feature: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_feature[r.feature_index].append(i)
    out = []
    for index, members in by_feature.items():
        width = int(lengths[members].max())
        tokens = np.full((len(members), width), -1, dtype=np.int64)
        values = np.zeros((len(members), width), dtype=np.float32)
        for j, i in enumerate(members):  # pad on the left: every context ends where its window did
            n = int(lengths[i])
            tokens[j, width - n :] = ids[ends[i] - n : ends[i]]
            values[j, width - n :] = acts[ends[i] - n : ends[i]]
        out.append(
            FeatureContexts(
                index=index,
                max_act=float(max_act.get(index, values.max())),
                tokens=tokens,
                acts=values,
                kinds=[rows[i].kind for i in members],
                ranks=np.array([rows[i].rank for i in members], dtype=np.int64),
                intervals=np.array([-1 if rows[i].interval is None else rows[i].interval for i in members], dtype=np.int64),
            )
        )
    return out
