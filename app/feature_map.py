"""The map of an SAE's features (sae_core/relations/map.py computes it): the map page, the data it
draws, the feature page's inset and the API's paged coordinates.

    /saes/{sae}/map                            the page (templates/map.html, static/map.js)
    /saes/{sae}/map/points.bin                 every point, packed (POINTS_FORMAT below)
    /saes/{sae}/map/labels.json                strongest token and explanation per point, in the same order
    /saes/{sae}/map/search?q=                  features whose explanation (full text) or strongest token matches q
    /saes/{sae}/features/{index}/map-inset     the feature page's inset: where it sits, its map neighbourhood
    /api/v1/saes/{sae}/map?offset=&limit=      coordinates, paged, as JSON

Everything is a pure function of the SAE's live run, so app/http.py gives it ETags and caches it.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from markupsafe import Markup
from pydantic import BaseModel, Field
from sqlalchemy import Connection, Row, select

from sae_core.relations import map as feature_map
from sae_core.store import explanation_search as store_search
from sae_core.store.schema import SAE, Explanation, Feature, FeatureMapPoint

from . import queries, schemas
from .annotations.models import Annotation
from .api import NOT_FOUND, NOT_MODIFIED, DictJSON
from .deps import read_connection
from .render import templates

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["v1"])
SaeName = Path(description="the SAE's name (its URL slug)", max_length=200)
FeatureIndex = Path(description="feature (latent) index", ge=0, le=2**31 - 1)

# points.bin, little-endian: b"SMAP", version, n, n_clusters (uint32 each), then five arrays of n:
# x, y (float32), feature index, cluster (int32, -1: none), log10 firing density (float32)
POINTS_MAGIC, POINTS_VERSION = b"SMAP", 1
SEARCH_LIMIT = 100_000  # explanation matches one map search lights up, at most
INSET_SIZE = 220  # px, the inset's side
INSET_SHADES = 8  # grey levels of the inset's density cells


class MapPoint(BaseModel):
    index: int = Field(description="feature index")
    x: float
    y: float
    cluster: int = Field(description="HDBSCAN cluster on the map, 0 the largest; -1: in no cluster")


class MapPage(BaseModel):
    sae: str
    run_id: int = Field(description="the mining run the map was made of (the SAE's live run)")
    seed: int
    n_points: int = Field(description="features on the map: those that fired in mining")
    n_clusters: int
    config: dict = Field(description="how it was made: method, metric, knn, n_neighbors, min_dist, min_cluster_size")
    offset: int
    limit: int
    points: list[MapPoint] = Field(description="in feature-index order")


def _live(conn: Connection, sae: str) -> tuple[queries.FeatureRef, Row | None]:
    """(FeatureRef, the run's feature_maps row or None); NotFound for an unknown or unmined SAE."""
    ref = queries.feature_ref(conn, sae, 0)
    assert ref.run_id is not None
    return ref, feature_map.map_info(conn, ref.run_id)


def _require_map(conn: Connection, sae: str) -> tuple[queries.FeatureRef, Row]:
    ref, info = _live(conn, sae)
    if info is None:
        raise queries.NotFound(f"{sae} has no map yet: run `saescope map --sae {sae}`")
    return ref, info


# --- the page and what it draws --------------------------------------------------------------------


@router.get("/saes/{sae}/map")
async def map_page(request: Request, sae: str = SaeName) -> Response:
    def render(conn: Connection) -> Response:
        ref, info = _live(conn, sae)
        ctx = {"sae": sae, "n_latents": ref.n_latents, "info": info}
        return templates.TemplateResponse(request, "map.html", ctx)

    return await read_connection(request, render)


_POINTS = (
    select(FeatureMapPoint.index, FeatureMapPoint.x, FeatureMapPoint.y, FeatureMapPoint.cluster, Feature.density)
    .join(Feature, (Feature.run_id == FeatureMapPoint.run_id) & (Feature.index == FeatureMapPoint.index))
    .order_by(FeatureMapPoint.index)
)


def points_bytes(conn: Connection, sae: str) -> bytes:
    _, info = _require_map(conn, sae)
    rows = conn.execute(_POINTS.where(FeatureMapPoint.run_id == info.run_id)).all()
    n = len(rows)
    cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
    index, x, y, cluster, density = (np.asarray(c) for c in cols)
    log_density = np.log10(np.maximum(density.astype(np.float64), 1e-12)) if n else np.zeros(0)
    head = POINTS_MAGIC + struct.pack("<III", POINTS_VERSION, n, info.n_clusters)
    arrays = (x.astype("<f4"), y.astype("<f4"), index.astype("<i4"), cluster.astype("<i4"), log_density.astype("<f4"))
    return head + b"".join(a.tobytes() for a in arrays)


@router.get("/saes/{sae}/map/points.bin")
async def map_points(request: Request, sae: str = SaeName) -> Response:
    body = await read_connection(request, points_bytes, sae)
    return Response(body, media_type="application/octet-stream")


def labels(conn: Connection, sae: str) -> dict:
    """Per point, in points.bin's order: the strongest token, the best-scored explanation and the team's
    label (app/annotations; None: none). A label's edit bumps the SAE's revision, so this is never stale."""
    ref, info = _require_map(conn, sae)
    vocab = queries.VOCAB.get(conn, ref.model_id)
    points = conn.execute(
        select(FeatureMapPoint.index, Feature.top_token_id)
        .join(Feature, (Feature.run_id == FeatureMapPoint.run_id) & (Feature.index == FeatureMapPoint.index))
        .where(FeatureMapPoint.run_id == info.run_id)
        .order_by(FeatureMapPoint.index)
    ).all()
    best: dict[int, tuple[float, str]] = {}
    for i, text, score in conn.execute(
        select(Explanation.feature_index, Explanation.text, Explanation.score).where(Explanation.run_id == info.run_id)
    ):
        value = -math.inf if score is None else score
        if i not in best or value > best[i][0]:
            best[i] = (value, text)
    label_of = dict(
        conn.execute(select(Annotation.feature_index, Annotation.label).join(SAE, SAE.id == Annotation.sae_id).where(SAE.name == sae)).all()
    )
    return {
        "tokens": [queries.token_or_none(vocab, t) for _, t in points],
        "explanations": [best[i][1] if i in best else None for i, _ in points],
        "labels": [label_of.get(i) for i, _ in points],
    }


@router.get("/saes/{sae}/map/labels.json")
async def map_labels(request: Request, sae: str = SaeName) -> DictJSON:
    return DictJSON(await read_connection(request, labels, sae))


def search(conn: Connection, sae: str, q: str) -> dict:
    """Features on the map whose explanation matches q (full text, stemmed: as /search does) or whose
    strongest token contains q (case-insensitive), in feature order."""
    ref, info = _require_map(conn, sae)
    by_text = {m.feature_index for m in store_search.full_text(conn, info.run_id, q, limit=SEARCH_LIMIT)}
    needle = q.strip().lower()
    by_token: set[int] = set()
    if needle:
        lowered = queries.VOCAB.lowered(conn, ref.model_id)
        token_ids = [t for t, s in enumerate(lowered) if needle in s]
        if token_ids:
            by_token = set(
                conn.execute(
                    select(Feature.index).where(Feature.run_id == info.run_id, Feature.n_fired > 0, Feature.top_token_id.in_(token_ids))
                ).scalars()
            )
    return {"q": q, "explanation_matches": len(by_text), "token_matches": len(by_token), "indices": sorted(by_text | by_token)}


@router.get("/saes/{sae}/map/search")
async def map_search(request: Request, sae: str = SaeName, q: str = Query(..., min_length=1, max_length=100)) -> DictJSON:
    return DictJSON(await read_connection(request, search, sae, q))


# --- the feature page's inset ----------------------------------------------------------------------


def inset_svg(grid: dict, x: float, y: float, size: int = INSET_SIZE) -> Markup:
    """The map's density grid as shaded cells, the feature as a ringed dot (y up, as on the map page).
    Drawn in grid units: one path per shade (INSET_SHADES of them), a cell a short `M x y h1v1h-1z`, so
    the fragment stays a few KB gzipped whatever the SAE's size."""
    n, counts = grid["size"], grid["counts"]
    (x0, x1), (y0, y1) = grid["x"], grid["y"]
    top = math.log1p(max(counts) or 1)
    shades: list[list[str]] = [[] for _ in range(INSET_SHADES)]
    for k, c in enumerate(counts):
        if c:
            shade = min(INSET_SHADES - 1, int(INSET_SHADES * math.log1p(c) / top))
            shades[shade].append(f"M{k % n} {n - 1 - k // n}h1v1h-1z")
    paths = "".join(
        f'<path fill-opacity="{0.12 + 0.88 * (i + 1) / INSET_SHADES:.2f}" d="{"".join(cells)}"/>' for i, cells in enumerate(shades) if cells
    )
    px, py = (x - x0) / (x1 - x0) * n, n - (y - y0) / (y1 - y0) * n
    return Markup(
        f'<svg class="map-inset" viewBox="0 0 {n} {n}" width="{size}" height="{size}" role="img" '
        f'aria-label="where this feature sits on the map of its SAE"><g class="density">{paths}</g>'
        f'<circle class="here-ring" cx="{px:.2f}" cy="{py:.2f}" r="{n / 24:.2f}" vector-effect="non-scaling-stroke"/>'
        f'<circle class="here" cx="{px:.2f}" cy="{py:.2f}" r="{n / 60:.2f}"/></svg>'
    )


def inset(conn: Connection, sae: str, index: int) -> dict:
    ref = queries.feature_ref(conn, sae, index)
    assert ref.run_id is not None
    info = feature_map.map_info(conn, ref.run_id)
    point = feature_map.map_point(conn, ref.run_id, index) if info is not None else None
    ctx: dict = {"sae": sae, "index": index, "info": info, "point": point, "svg": None, "neighbours": []}
    if info is None or point is None:
        return ctx
    near = point.neighbours
    rows = conn.execute(
        select(Feature.index, Feature.top_token_id).where(Feature.run_id == ref.run_id, Feature.index.in_([i for i, _ in near]))
    ).all()
    explained = dict(
        conn.execute(
            select(Explanation.feature_index, Explanation.text)
            .where(Explanation.run_id == ref.run_id, Explanation.feature_index.in_([i for i, _ in near]))
            .order_by(Explanation.score.asc().nulls_first())  # the best-scored last, so it wins in the dict
        ).all()
    )
    vocab = queries.VOCAB.get(conn, ref.model_id)
    token_of = {i: queries.token_or_none(vocab, t) for i, t in rows}
    ctx["svg"] = inset_svg(info.grid, point.x, point.y)
    ctx["neighbours"] = [{"index": i, "distance": d, "token": token_of.get(i), "explanation": explained.get(i)} for i, d in near]
    return ctx


@router.get("/saes/{sae}/features/{index}/map-inset")
async def map_inset(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> Response:
    def render(conn: Connection) -> Response:
        return templates.TemplateResponse(request, "_map_inset.html", inset(conn, sae, index))

    return await read_connection(request, render)


# --- the API ---------------------------------------------------------------------------------------


def page(conn: Connection, sae: str, offset: int, limit: int) -> dict:
    _, info = _require_map(conn, sae)
    points = feature_map.map_points(conn, info.run_id, offset, limit)
    return {
        "sae": sae,
        "run_id": info.run_id,
        "seed": info.seed,
        "n_points": info.n_points,
        "n_clusters": info.n_clusters,
        "config": info.config,
        "offset": offset,
        "limit": limit,
        "points": [{"index": i, "x": x, "y": y, "cluster": c} for i, x, y, c in points],
    }


@api_router.get(
    "/saes/{sae}/map",
    response_model=MapPage,
    summary="The SAE's feature map: 2-D coordinates and cluster of every alive feature, paged in feature order",
    responses={**NOT_MODIFIED, **NOT_FOUND, 404: {"model": schemas.Problem, "description": "No such SAE, not mined, or no map yet"}},
)
async def map_api(
    request: Request,
    sae: str = SaeName,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(1000, ge=1, le=10_000),
) -> DictJSON:
    return DictJSON(await read_connection(request, page, sae, offset, limit))
