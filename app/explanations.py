"""Read side of the explanations table (sae_core/explain writes it): a feature's explanations for its
page and the API, and the one-line explanation and score of each row of the SAE's feature table."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, func, select

from sae_core.store.schema import Explanation

from . import schemas
from .prepared import json_value

TABLE_METHOD = "n2g"  # the SAE table's explanation column and its sort key

# A feature's explanations, best first: app/queries.py joins these columns to the feature's own row
# (one statement for both; a feature has one row per method, usually one)
COLUMNS = (
    Explanation.method,
    Explanation.text,
    Explanation.patterns,
    Explanation.precision,
    Explanation.recall,
    Explanation.score,
    Explanation.scores,
)
ORDER = (Explanation.score.desc(), Explanation.method)
_FOR_TABLE = select(Explanation.feature_index, Explanation.text, Explanation.score).where(
    Explanation.run_id == bindparam("run_id"),
    Explanation.method == TABLE_METHOD,
    Explanation.feature_index.in_(bindparam("indices", expanding=True)),
)


def _token(vocab: list[str], t: int | None) -> str | None:
    if t is None:
        return None
    return vocab[t] if 0 <= t < len(vocab) else f"<{t}>"


def from_rows(rows: list[tuple], vocab: list[str]) -> list[schemas.ExplanationOut]:
    """The explanations of COLUMNS' rows (method None: the feature has none, from the outer join)."""
    out = []
    for method, text, patterns, precision, recall, score, scores in rows:
        if method is None:
            continue
        pats = [
            schemas.ExplanationPattern(
                tokens=[_token(vocab, t) for t in q["tokens"]],
                token_ids=q["tokens"],
                examples=q.get("examples", 0),
                matches=q.get("matches", 0),
                fired=q.get("fired", 0),
            )
            for q in json_value(patterns) or []
        ]
        out.append(
            schemas.ExplanationOut(
                method=method, text=text, patterns=pats, precision=precision, recall=recall, score=score, scores=json_value(scores) or {}
            )
        )
    return out


def for_table(conn: Connection, run_id: int, indices: list[int]) -> dict[int, tuple[str, float | None]]:
    if not indices:
        return {}
    return {i: (text, score) for i, text, score in conn.execute(_FOR_TABLE, {"run_id": run_id, "indices": indices})}


def table_rows(conn: Connection, cond: list, columns: tuple, offset: int, limit: int, desc: bool) -> tuple[int, list]:
    """(rows in the filter, the page's rows) of the SAE table sorted by the table method's score, features
    without an explanation last in either order (one join; OFFSET paging)."""
    from sae_core.store.schema import Feature

    joined = (Explanation.run_id == Feature.run_id) & (Explanation.feature_index == Feature.index) & (Explanation.method == TABLE_METHOD)
    total = conn.scalar(select(func.count()).select_from(Feature).where(*cond)) or 0
    score = Explanation.score.desc() if desc else Explanation.score.asc()
    ordering = (score.nulls_last(), Feature.index.desc() if desc else Feature.index.asc())
    rows = conn.execute(select(*columns).outerjoin(Explanation, joined).where(*cond).order_by(*ordering).offset(offset).limit(limit))
    return total, list(rows)
