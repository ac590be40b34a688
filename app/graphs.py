"""Attribution graphs stored by `saescope trace` (sae_core/circuits/trace.py): the list, the graph page and its JSON.

    /graphs                      the stored graphs, newest first
    /graphs/{slug}               a graph's page (templates/graph.html; static/graph.js draws it from the JSON)
    /api/v1/graphs               the list as JSON
    /api/v1/transcoder-sets      the transcoder sets a graph can be built with
    /api/v1/graphs/{slug}        a graph: nodes (with their SAE, explanation and strongest tokens where the transcoder
                                 of their layer was mined), edges and its check by ablation (faithfulness)

A graph's feature nodes link to feature pages through the SAE mined from their layer's transcoder folder, looked up
when the graph is read (a transcoder mined after the trace links too). Graphs are built by the CLI or by the bounded
model process (POST /api/v1/trace and the /graphs page's form: app/live/graphs.py), never in a page handler: these
routes only read the store.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from sae_core.circuits.trace import TraceConfig
from sae_core.errors import NotFound
from sae_core.store import graphs as store_graphs

from . import queries, schemas
from .api import DictJSON
from .deps import read_connection
from .render import templates

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["v1"])
Slug = Path(description="the graph's permalink slug (printed by `saescope trace`)", max_length=32)
GRAPH_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": schemas.Problem, "description": "No stored graph with this slug"}}
TABLE_ROWS = 60  # feature nodes listed under the graph, strongest influence first
STEER_VALUE = 0.0  # the steering link clamps the feature to this (ablation: does the graph's path hold?)


class GraphNode(BaseModel):
    id: int = Field(description="node id, the edges' source and target")
    kind: str = Field(description="feature, error, embedding or logit")
    layer: int = Field(description="the transcoder's layer; -1 for token embeddings, n_layers for logits")
    pos: int = Field(description="token position (logits: the last)")
    influence: float = Field(description="the node's influence on the chosen logits in the unpruned graph")
    feature: int | None = Field(None, description="feature index in its layer's transcoder (feature nodes)")
    activation: float | None = Field(None, description="the feature's activation (feature nodes)")
    token: int | None = Field(None, description="token id (embedding and logit nodes)")
    text: str | None = Field(None, description="token text (embedding and logit nodes)")
    probability: float | None = Field(None, description="the logit's probability (logit nodes)")
    rank: int | None = Field(None, description="the logit's rank, 0 the top (logit nodes)")
    sae: str | None = Field(None, description="the SAE mined from this layer's transcoder, if any")
    url: str | None = Field(None, description="the feature's page, where its transcoder was mined")
    steer_url: str | None = Field(None, description="the steering page for this feature on the graph's prompt")
    explanation: str | None = Field(None, description="the feature's best-scored explanation, if any")
    top_token: str | None = Field(None, description="the token its strongest mined context peaks on")
    promotes: list[str] = Field(default_factory=list, description="output tokens its decoder raises most")


class GraphEdge(BaseModel):
    source: int
    target: int
    weight: float = Field(description="source activation x derivative of the target's pre-activation (signed)")


class EdgeCheck(BaseModel):
    source: int = Field(description="node id of the ablated feature")
    target: int = Field(description="node id whose change was measured")
    weight: float = Field(description="the edge's weight in the graph")
    predicted: float = Field(description="the graph's prediction for the target's change: -weight")
    measured: float = Field(description="the target's change in the real model with the source ablated")
    match: bool = Field(description="same sign and within the factor")


class NodeCheck(BaseModel):
    node: int = Field(description="node id of the strongest kept feature node (by influence)")
    layer: int
    pos: int
    feature: int
    logit_token: int = Field(description="the top logit's token id")
    predicted: float = Field(description="the graph's sum over paths for the demeaned top logit's change")
    predicted_direct: float = Field(description="the direct edge only (every other feature held)")
    measured: float = Field(description="the demeaned top logit's change in the real model")
    match: bool = Field(description="measured vs predicted: same sign and within the factor")
    match_direct: bool = Field(description="measured vs predicted_direct, by the same rule")


class Verification(BaseModel):
    checked: int = Field(description="edges checked by ablation (the strongest kept edges with a feature source)")
    matched: int
    share: float | None = Field(description="matched / checked (None when nothing was checked)")
    factor: float
    rule: str = Field(description="when an edge matches")
    edges: list[EdgeCheck]
    strongest: NodeCheck | None = Field(description="ablating the strongest feature node: the top logit's change")


class GraphSummary(BaseModel):
    slug: str
    url: str
    prompt: str
    model: str
    transcoders_path: str
    n_tokens: int
    nodes_after: int = Field(description="nodes kept by pruning")
    edges_after: int = Field(description="edges kept by pruning")
    replacement_score: float = Field(description="of the unpruned graph (Ameisen et al. 2025)")
    completeness_score: float
    created_at: str


class GraphList(BaseModel):
    total: int
    offset: int
    limit: int
    graphs: list[GraphSummary]


class GraphDetail(GraphSummary):
    tokens: list[str]
    n_layers: int
    config: dict = Field(description="thresholds and attribution settings")
    nodes_before: int
    edges_before: int
    pruned_scores: dict = Field(description="replacement and completeness of the pruned graph")
    seconds: float = Field(description="wall time of the build")
    top_path: list[int] = Field(description="node ids of the strongest chain from a token to the top logit")
    verification: Verification | None = Field(
        None, description="the graph checked by ablation in the real model (sae_core/circuits/verify.py); None if not checked"
    )
    nodes: list[GraphNode]
    edges: list[GraphEdge]


def _summary(row: Any) -> dict:
    return {
        "slug": row.slug,
        "url": f"/graphs/{row.slug}",
        "prompt": row.prompt,
        "model": row.model,
        "transcoders_path": row.transcoders_path,
        "n_tokens": row.n_tokens,
        "nodes_after": row.nodes_after,
        "edges_after": row.edges_after,
        "replacement_score": row.replacement_score,
        "completeness_score": row.completeness_score,
        "created_at": row.created_at.isoformat(),
    }


def graph_list(conn: Connection, offset: int, limit: int) -> dict:
    rows = store_graphs.list_graphs(conn, limit, offset)
    return {"total": store_graphs.count_graphs(conn), "offset": offset, "limit": limit, "graphs": [_summary(r) for r in rows]}


class TranscoderSetInfo(BaseModel):
    folder: str = Field(description="the `saescope train --transcoders` folder: what POST /api/v1/trace takes as `transcoders`")
    name: str = Field(description="the folder's last part")
    model: str
    graphs: int = Field(description="graphs stored with it")
    mined: int = Field(description="its layers mined into this store (their features have pages)")


def transcoder_sets(conn: Connection) -> list[dict]:
    """The transcoder sets a graph can be built with: those the store knows of (store_graphs.transcoder_set_folders)
    whose folder still holds a set (its summary file), by name. Only these: a request never names a folder of its
    own choosing."""
    from sae_core.train_transcoders import SUMMARY

    known = store_graphs.transcoder_set_folders(conn)
    out = [{"folder": f, "name": FilePath(f).name, **info} for f, info in known.items() if (FilePath(f) / SUMMARY).is_file()]
    return sorted(out, key=lambda s: (s["name"], s["folder"]))


def known_transcoder_set(conn: Connection, folder: str) -> dict:
    """The set at `folder` if the store knows it (NotFound with the known ones otherwise)."""
    sets = transcoder_sets(conn)
    for found in sets:
        if found["folder"] == folder:
            return found
    known = ", ".join(s["folder"] for s in sets) or "none yet: `saescope trace` with a set, or mine its layers"
    raise NotFound(f"no transcoder set {folder!r} in this store; known sets (GET /api/v1/transcoder-sets): {known}")


def steer_url(sae: str, index: int, prompt: str) -> str:
    """The steering page on the graph's prompt with the feature ablated; it runs on opening (a transcoder's
    feature is steered at its MLP's output, sae_core/live/interventions.py)."""
    query = urlencode({"prompt": prompt, "feature": index, "mode": "clamp", "value": f"{STEER_VALUE:g}"})
    return f"/saes/{quote(sae, safe='')}/steer?{query}"


def graph_detail(conn: Connection, slug: str) -> dict:
    """The stored graph with each feature node's SAE, links, explanation and strongest tokens."""
    row = store_graphs.find_graph(conn, slug)
    if row is None:
        raise NotFound(f'no attribution graph {slug!r} in this store: build one with `saescope trace "prompt" --transcoders DIR`')
    graph = store_graphs.unpack_graph(row.graph)
    layer_saes = store_graphs.transcoder_saes(conn, row.layer_folders)
    by_layer: dict[int, list[int]] = {}
    for node in graph["nodes"]:
        if node["kind"] == "feature":
            by_layer.setdefault(node["layer"], []).append(node["feature"])
    notes: dict[int, dict[int, tuple]] = {}
    vocab: dict[int, list[str]] = {}
    for layer, (sae, run_id) in layer_saes.items():
        notes[layer] = store_graphs.feature_notes(conn, run_id, by_layer.get(layer, []))
        vocab[layer] = queries.VOCAB.get(conn, queries.feature_ref(conn, sae, 0).model_id)
    nodes = []
    for node in graph["nodes"]:
        out = {**node}
        layer = node["layer"]
        if node["kind"] == "feature" and layer in layer_saes:
            sae = layer_saes[layer][0]
            index = node["feature"]
            out["sae"] = sae
            out["url"] = f"/saes/{sae}/features/{index}"
            out["steer_url"] = steer_url(sae, index, row.prompt)
            explanation, top_token, top_logits = notes[layer].get(index, (None, None, []))
            out["explanation"] = explanation
            out["top_token"] = queries.token_or_none(vocab[layer], top_token)
            out["promotes"] = [queries.token_text(vocab[layer], int(t)) for t, _ in top_logits[:5]]
        nodes.append(out)
    return {
        **_summary(row),
        "tokens": graph["tokens"],
        "n_layers": graph["n_layers"],
        "config": row.config,
        "nodes_before": row.nodes_before,
        "edges_before": row.edges_before,
        "pruned_scores": row.scores.get("pruned", {}),
        "seconds": row.seconds,
        "top_path": graph["top_path"],
        "verification": row.scores.get("verification"),
        "nodes": nodes,
        "edges": [{"source": s, "target": t, "weight": w} for s, t, w in graph["edges"]],
        "layer_folders": row.layer_folders,
        "layer_saes": {str(k): v[0] for k, v in layer_saes.items()},
    }


def node_label(node: dict) -> str:
    """A node in words, as the page and `saescope trace` say it."""
    kind = node["kind"]
    if kind == "embedding":
        return f"token {node['text']!r} (position {node['pos']})"
    if kind == "logit":
        return f"output {node['text']!r} (p {node['probability']:.2f})"
    if kind == "error":
        return f"error of layer {node['layer']} at position {node['pos']}"
    name = f"{node['sae']} #{node['feature']}" if node.get("sae") else f"layer {node['layer']} feature {node['feature']}"
    if node.get("explanation"):
        words = f": {node['explanation']}"
    else:
        words = f": fires on {node['top_token']!r}" if node.get("top_token") else ""
    return f"{name} at position {node['pos']}{words}"


# --- pages ---------------------------------------------------------------------------------------


@router.get("/graphs")
async def graphs_page(
    request: Request,
    offset: int = Query(0, ge=0, le=10**9),
    prompt: str = Query("", max_length=2000),
    transcoders: str = Query("", max_length=4096),
    node_threshold: float = Query(0.8, gt=0, le=1),
    edge_threshold: float = Query(0.98, gt=0, le=1),
) -> Response:
    """The stored graphs, and (live features on) the form that builds one: its query is the form's fields, so a
    link can prefill it (the build itself is a POST the page streams: app/live/graphs.py)."""
    live_off = request.app.state.live.off

    def render(conn: Connection) -> Response:
        form = {
            "prompt": prompt,
            "transcoders": transcoders,
            "node_threshold": f"{node_threshold:g}",
            "edge_threshold": f"{edge_threshold:g}",
        }
        ctx = {
            **graph_list(conn, offset, 100),
            "sets": transcoder_sets(conn),
            "live_off": live_off,
            "form": form,
            "max_tokens": TraceConfig.max_prompt_tokens,
            "time_limit": request.app.state.live.limits.graph_time_limit,
        }
        return templates.TemplateResponse(request, "graphs.html", ctx)

    return await read_connection(request, render)


@router.get("/graphs/{slug}")
async def graph_page(request: Request, slug: str = Slug) -> Response:
    def render(conn: Connection) -> Response:
        detail = graph_detail(conn, slug)
        features = sorted((n for n in detail["nodes"] if n["kind"] == "feature"), key=lambda n: -n["influence"])[:TABLE_ROWS]
        path = [node_label(detail["nodes"][i]) for i in detail["top_path"]]
        unmined = {layer: folder for layer, folder in detail["layer_folders"].items() if layer not in detail["layer_saes"]}
        ctx = {"g": detail, "features": features, "path": path, "unmined": unmined, "tokens": detail["tokens"]}
        return templates.TemplateResponse(request, "graph.html", ctx)

    return await read_connection(request, render)


# --- the API -------------------------------------------------------------------------------------


@api_router.get("/graphs", response_model=GraphList, summary="Stored attribution graphs, newest first")
async def graphs_api(request: Request, offset: int = Query(0, ge=0, le=10**9), limit: int = Query(100, ge=1, le=1000)) -> DictJSON:
    return DictJSON(await read_connection(request, graph_list, offset, limit))


@api_router.get("/transcoder-sets", response_model=list[TranscoderSetInfo], summary="Transcoder sets a graph can be built with")
async def transcoder_sets_api(request: Request) -> DictJSON:
    """The sets this store knows of (graphs were traced with them, or their layers were mined) whose folder still
    holds a set: POST /api/v1/trace takes one's `folder` as `transcoders`."""
    return DictJSON(await read_connection(request, transcoder_sets))


@api_router.get(
    "/graphs/{slug}",
    response_model=GraphDetail,
    summary="A stored attribution graph: its pruned nodes (feature nodes with their SAE, explanation, links) and edges",
    responses=GRAPH_NOT_FOUND,
)
async def graph_api(request: Request, slug: str = Slug) -> DictJSON:
    def work(conn: Connection) -> dict:
        detail = graph_detail(conn, slug)
        detail.pop("layer_folders")
        detail.pop("layer_saes")
        return detail

    return DictJSON(await read_connection(request, work))
