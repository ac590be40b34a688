"""Suggested supernodes of a stored attribution graph (issue 29 item 3; sae_core/circuits/supernodes.py groups them).

    /api/v1/graphs/{slug}/supernodes    groups of feature nodes that share an explanation, have near decoders or
                                        co-fire, each with a label and the numbers behind it

The graph page (static/graph.js) lists them for the user to accept, rename or dismiss; accepted groups live in the
page's URL (#group=...), not in the store. Decoder rows come from the run's stored weights where the layer's transcoder
was mined (what the feature pages describe), else from the folder the graph was traced from; co-activation only from
mined layers. The extracted rows are cached per graph and run, so a reload does not read the weights again: reading
one 8192 x 576 transcoder takes ~0.25 s on 2 cores (folder or stored bytes alike), so a graph over all 30 of the
bundled model's layers costs ~8 s on its first request and milliseconds after (the tiny test graph: 145 ms, then 13 ms).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import Connection, select

from sae_core.circuits.supernodes import FeatureNode, SupernodeConfig, suggest
from sae_core.errors import SaescopeError
from sae_core.store import graphs as store_graphs
from sae_core.store.schema import Feature

from .api import DictJSON
from .deps import read_connection
from .graphs import GRAPH_NOT_FOUND, Slug, graph_detail

api_router = APIRouter(prefix="/api/v1", tags=["v1"])
CACHE_GRAPHS = 8  # graphs whose decoder rows are kept
_rows_cache: OrderedDict[tuple, tuple[dict[int, dict[int, np.ndarray]], dict[str, str]]] = OrderedDict()


class GroupReason(BaseModel):
    kind: str = Field(description="explanation (text Jaccard), decoder (W_dec cosine, same layer) or cofire (co-activation Jaccard)")
    source: int = Field(description="node id")
    target: int = Field(description="node id")
    value: float = Field(description="the Jaccard or cosine that linked the pair")


class GroupSuggestion(BaseModel):
    members: list[int] = Field(description="node ids, strongest influence first")
    label: str = Field(description="the explanation most members share, else their most common strongest token")
    influence: float = Field(description="the members' summed influence")
    reasons: list[GroupReason]


class SupernodeSuggestions(BaseModel):
    slug: str
    thresholds: dict[str, float] = Field(description="the thresholds these groups were found with")
    decoder_sources: dict[str, str] = Field(description="layer -> where its decoder rows came from (store run or folder)")
    cofire_layers: list[int] = Field(description="layers whose mined co-activation table was used")
    suggestions: list[GroupSuggestion]


def _decoder_rows(conn: Connection, layer: int, wanted: list[int], sae: str | None, folder: str | None) -> tuple[np.ndarray | None, str]:
    """W_dec rows `wanted` of one layer's transcoder: the mined run's weights, else the traced folder's."""
    from sae_core.interchange import load_sae
    from sae_core.store.weights import load_run_sae

    if sae is not None:
        run, loaded = load_run_sae(conn, sae)
        where = f"store: {sae} (run {run.run_id})" if run.source == "store" else f"folder: {run.source}"
    elif folder and Path(folder).is_dir():
        loaded, where = load_sae(folder), f"folder: {folder}"
    else:
        return None, f"none: {folder} is not on this machine and the layer is not mined"
    w = loaded.sae.W_dec.detach()
    return w[wanted].double().numpy(), where


def _all_rows(
    conn: Connection, slug: str, detail: dict, runs: dict[int, tuple[str, int]], by_layer: dict[int, list[int]]
) -> tuple[dict[int, dict[int, np.ndarray]], dict[str, str]]:
    saes = {str(layer): name for layer, (name, _) in runs.items()}
    folders = {int(k): v for k, v in detail["layer_folders"].items()}
    # a re-trace (created_at) or a re-mine (run ids) changes the key: cached rows are never stale
    key = (slug, detail["created_at"], tuple(sorted(runs.items())), tuple(sorted((k, tuple(v)) for k, v in by_layer.items())))
    if key in _rows_cache:
        _rows_cache.move_to_end(key)
        return _rows_cache[key]
    rows: dict[int, dict[int, np.ndarray]] = {}
    sources: dict[str, str] = {}
    for layer, wanted in sorted(by_layer.items()):
        try:
            got, where = _decoder_rows(conn, layer, wanted, saes.get(str(layer)), folders.get(layer))
        except SaescopeError as exc:  # a run without weights whose folder is gone: group this layer without decoders
            got, where = None, f"none: {exc}"
        sources[str(layer)] = where
        if got is not None:
            rows[layer] = dict(zip(wanted, got))
    _rows_cache[key] = (rows, sources)
    while len(_rows_cache) > CACHE_GRAPHS:
        _rows_cache.popitem(last=False)
    return rows, sources


def _cofire(conn: Connection, runs: dict[int, tuple[str, int]], by_layer: dict[int, list[int]]) -> dict[int, dict[int, dict[int, float]]]:
    """layer -> feature -> partner -> Jaccard, from each mined layer's co-activation rows."""
    out: dict[int, dict[int, dict[int, float]]] = {}
    for layer, (_, run_id) in runs.items():
        wanted = by_layer.get(layer)
        if not wanted:
            continue
        query = select(Feature.index, Feature.coactivation).where(Feature.run_id == run_id, Feature.index.in_(sorted(set(wanted))))
        table = {int(i): {int(p[0]): float(p[3]) for p in rows} for i, rows in conn.execute(query) if rows is not None}
        if table:
            out[layer] = table
    return out


def supernode_suggestions(conn: Connection, slug: str, cfg: SupernodeConfig) -> dict[str, Any]:
    detail = graph_detail(conn, slug)  # NotFound (404) for an unknown slug
    features = [n for n in detail["nodes"] if n["kind"] == "feature"]
    by_layer: dict[int, list[int]] = {}
    for n in features:
        by_layer.setdefault(n["layer"], [])
        if n["feature"] not in by_layer[n["layer"]]:
            by_layer[n["layer"]].append(n["feature"])
    for wanted in by_layer.values():
        wanted.sort()
    runs = store_graphs.transcoder_saes(conn, detail["layer_folders"])
    decoders, sources = _all_rows(conn, slug, detail, runs, by_layer)
    cofire = _cofire(conn, runs, by_layer)
    nodes = [
        FeatureNode(n["id"], n["layer"], n["pos"], n["feature"], n["influence"], n.get("explanation"), n.get("top_token")) for n in features
    ]
    found = suggest(nodes, cfg, decoders, cofire)
    return {
        "slug": slug,
        "thresholds": {
            "explanation_jaccard": cfg.explanation_jaccard,
            "decoder_cosine": cfg.decoder_cosine,
            "cofire_jaccard": cfg.cofire_jaccard,
            "max_pos_gap": cfg.max_pos_gap,
        },
        "decoder_sources": sources,
        "cofire_layers": sorted(cofire),
        "suggestions": [
            {"members": s.members, "label": s.label, "influence": s.influence, "reasons": [r.__dict__ for r in s.reasons]} for s in found
        ],
    }


@api_router.get(
    "/graphs/{slug}/supernodes",
    response_model=SupernodeSuggestions,
    summary="Suggested supernodes: feature nodes at nearby positions that share an explanation, have near decoders or co-fire",
    responses=GRAPH_NOT_FOUND,
)
async def supernodes_api(
    request: Request,
    slug: str = Slug,
    explanation_jaccard: float = Query(
        SupernodeConfig.explanation_jaccard, gt=0, le=1, description="text Jaccard to link two explanations"
    ),
    decoder_cosine: float = Query(SupernodeConfig.decoder_cosine, gt=0, le=1, description="W_dec cosine to link two features of a layer"),
    cofire_jaccard: float = Query(SupernodeConfig.cofire_jaccard, gt=0, le=1, description="co-activation Jaccard to link two features"),
    max_pos_gap: int = Query(SupernodeConfig.max_pos_gap, ge=0, le=64, description="how many token positions apart linked nodes may be"),
) -> DictJSON:
    cfg = SupernodeConfig(explanation_jaccard, decoder_cosine, cofire_jaccard, max_pos_gap)
    return DictJSON(await read_connection(request, supernode_suggestions, slug, cfg))
