"""Stored attribution graphs (`saescope trace`; the table is schema.AttributionGraphRecord).

A stored graph is the pruned graph as plain JSON (sae_core/circuits/trace.py builds it): the prompt's tokens, the
chosen logits, the kept nodes and the kept edges as [source, target, weight] between node ids, zlib-compressed. The
store's array codec (codec.py) packs token and activation rows; a graph is a small table of mixed records, so JSON
it is. Graphs are keyed by slug (the permalink); writing a slug that exists fails unless `replace` says to swap it.
"""

from __future__ import annotations

import zlib
from pathlib import PurePath
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, Row, delete, func, insert, select

from ..errors import SaescopeError
from .schema import SAE, AttributionGraphRecord, Explanation, Feature, Model

LIST_COLUMNS = (
    AttributionGraphRecord.slug,
    AttributionGraphRecord.prompt,
    AttributionGraphRecord.model,
    AttributionGraphRecord.transcoders_path,
    AttributionGraphRecord.n_tokens,
    AttributionGraphRecord.nodes_after,
    AttributionGraphRecord.edges_after,
    AttributionGraphRecord.replacement_score,
    AttributionGraphRecord.completeness_score,
    AttributionGraphRecord.created_at,
)


def pack_graph(graph: dict[str, Any]) -> bytes:
    return zlib.compress(orjson.dumps(graph, option=orjson.OPT_SERIALIZE_NUMPY), 6)


def unpack_graph(blob: bytes) -> dict[str, Any]:
    try:
        return dict(orjson.loads(zlib.decompress(blob)))
    except (zlib.error, orjson.JSONDecodeError) as exc:
        raise SaescopeError(f"a stored attribution graph is not compressed JSON ({exc}); trace it again with --force") from exc


def save_graph(engine: Engine, values: dict[str, Any], graph: dict[str, Any], replace: bool = False) -> int:
    """Insert a graph row (`values`: the table's columns but id, graph and created_at); returns its id. With
    `replace`, a row with the same slug is deleted in the same transaction (`saescope trace --force`)."""
    with engine.begin() as conn:
        if replace:
            conn.execute(delete(AttributionGraphRecord).where(AttributionGraphRecord.slug == values["slug"]))
        elif conn.execute(select(AttributionGraphRecord.id).where(AttributionGraphRecord.slug == values["slug"])).first():
            raise SaescopeError(f"a graph with slug {values['slug']} is already stored; pass --force to build it again")
        query = insert(AttributionGraphRecord).values(**values, graph=pack_graph(graph)).returning(AttributionGraphRecord.id)
        return int(conn.execute(query).scalar_one())


def find_graph(conn: Connection, slug: str) -> Row | None:
    """The whole row of the graph with this slug (the graph still packed), or None."""
    return conn.execute(select(AttributionGraphRecord).where(AttributionGraphRecord.slug == slug)).first()


def list_graphs(conn: Connection, limit: int = 100, offset: int = 0) -> list[Row]:
    """The newest graphs first, without their packed graphs."""
    query = select(*LIST_COLUMNS).order_by(AttributionGraphRecord.created_at.desc(), AttributionGraphRecord.id.desc())
    return list(conn.execute(query.limit(limit).offset(offset)).all())


def count_graphs(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(AttributionGraphRecord)).scalar_one())


def transcoder_saes(conn: Connection, layer_folders: dict[str, str] | dict[int, str]) -> dict[int, tuple[str, int]]:
    """layer -> (SAE name, live run id) for each layer whose transcoder folder was mined (`saescope mine --sae
    DIR/layer_L` records the folder, resolved, as the SAE's path); layers never mined are left out."""
    by_path: dict[str, int] = {str(folder): int(layer) for layer, folder in layer_folders.items()}
    if not by_path:
        return {}
    rows = conn.execute(select(SAE.name, SAE.path, SAE.active_run_id).where(SAE.path.in_(list(by_path)), SAE.active_run_id.is_not(None)))
    return {by_path[path]: (name, run_id) for name, path, run_id in rows if run_id is not None}


def feature_notes(conn: Connection, run_id: int, indices: list[int]) -> dict[int, tuple[str | None, int | None, list]]:
    """index -> (best-scored explanation or None, strongest token id or None, top output logits [[token id, value]..])
    for the given features of a run."""
    if not indices:
        return {}
    wanted = sorted(set(indices))
    explained: dict[int, str] = {}
    rows = conn.execute(
        select(Explanation.feature_index, Explanation.text)
        .where(Explanation.run_id == run_id, Explanation.feature_index.in_(wanted))
        .order_by(Explanation.score.asc().nulls_first())  # the best-scored last, so it wins in the dict
    )
    for index, text in rows:
        explained[index] = text
    out = {}
    query = select(Feature.index, Feature.top_token_id, Feature.logits).where(Feature.run_id == run_id, Feature.index.in_(wanted))
    for index, top_token, logits in conn.execute(query):
        out[index] = (explained.get(index), top_token, list((logits or {}).get("top", [])))
    return out


def transcoder_set_folders(conn: Connection) -> dict[str, dict[str, Any]]:
    """The transcoder sets this store knows of, by folder: those graphs were traced with, and the parents of mined
    transcoders' folders (`saescope mine --sae DIR/layer_L`); folder -> {"model", "graphs": graphs stored with it,
    "mined": its layers mined}. Whether a folder still holds a set is for the caller to check."""
    out: dict[str, dict[str, Any]] = {}
    rows = conn.execute(
        select(AttributionGraphRecord.transcoders_path, AttributionGraphRecord.model, func.count()).group_by(
            AttributionGraphRecord.transcoders_path, AttributionGraphRecord.model
        )
    )
    for folder, model, n in rows:
        out.setdefault(folder, {"model": model, "graphs": 0, "mined": 0})["graphs"] += int(n)
    mined = conn.execute(
        select(SAE.path, Model.name).join(Model, Model.id == SAE.model_id).where(SAE.architecture.in_(("transcoder", "skip_transcoder")))
    )
    for path, model in mined:
        out.setdefault(str(PurePath(path).parent), {"model": model, "graphs": 0, "mined": 0})["mined"] += 1
    return out
