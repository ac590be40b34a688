"""The REST API, version 1 (shapes in app/schemas.py and docs/api.md)."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from . import queries, schemas
from .deps import read_connection

router = APIRouter(prefix="/api/v1", tags=["v1"])
SaeName = Path(description="the SAE's name (its URL slug)", max_length=200)
NO_NUL = r"^[^\x00]*$"  # what a text parameter admits: http.RefuseNul answers 400 to a NUL before any route
FeatureIndex = Path(description="feature (latent) index", ge=0, le=2**31 - 1)
# Every store read answers with an ETag and a 304 to a matching If-None-Match (app/http.py).
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not Modified: the If-None-Match ETag is current (the SAE was not re-mined)"}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Problem, "description": "No such SAE or feature, or the SAE has not been mined yet"}
}


class DictJSON(Response):
    """JSON of a plain dict already in its response model's shape, encoded by orjson. FastAPI passes a
    returned Response through as is: no second validation of data read from our own store."""

    media_type = "application/json"

    def render(self, content: dict) -> bytes:
        return orjson.dumps(content)


@router.get("/health", response_model=schemas.Health, summary="Liveness and schema revision (no database work)")
async def health(request: Request) -> schemas.Health:
    return schemas.Health(status="ok", schema_revision=request.app.state.schema_revision)


@router.get("/models", response_model=list[schemas.ModelSummary], summary="Models and their SAEs", responses=NOT_MODIFIED)
async def models(request: Request) -> list[schemas.ModelSummary]:
    return await read_connection(request, queries.list_models)


@router.get("/saes", response_model=list[schemas.SAESummary], summary="Every SAE with its headline metrics", responses=NOT_MODIFIED)
async def saes(request: Request) -> list[schemas.SAESummary]:
    return [sae for model in await read_connection(request, queries.list_models) for sae in model.saes]


@router.get(
    "/saes/{sae}",
    response_model=schemas.SAEDetail,
    summary="One SAE: metrics, training and mining configuration",
    responses={**NOT_MODIFIED, **NOT_FOUND},
)
async def sae(request: Request, sae: str = SaeName) -> schemas.SAEDetail:
    return await read_connection(request, queries.sae_detail, sae)


@router.get(
    "/saes/{sae}/features",
    response_model=schemas.FeaturePage,
    summary="A page of features, sorted and filtered",
    responses={**NOT_MODIFIED, **NOT_FOUND},
)
async def features(
    request: Request,
    sae: str = SaeName,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(50, ge=1, le=1000),
    sort: queries.SortKey = Query("index"),
    order: Literal["asc", "desc"] = Query("asc"),
    filter: queries.Filter = Query("all", description="all, alive (fired at least once), dead (never fired), rare (density < 1e-4)"),
) -> schemas.FeaturePage:
    return await read_connection(request, queries.feature_page, sae, offset, limit, sort, order, filter)


@router.get(
    "/saes/{sae}/features/{index}",
    response_model=schemas.FeatureDetail,
    summary="One feature's statistics, histogram, logit effects and neighbours",
    responses={**NOT_MODIFIED, **NOT_FOUND},
)
async def feature(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> schemas.FeatureDetail:
    return await read_connection(request, queries.feature_detail, sae, index)


@router.get(
    "/saes/{sae}/features/{index}/examples",
    response_model=schemas.ExamplePage,
    summary="A feature's top-activating contexts or interval samples",
    responses={**NOT_MODIFIED, **NOT_FOUND},
)
async def examples(
    request: Request,
    sae: str = SaeName,
    index: int = FeatureIndex,
    kind: schemas.ExampleKind = Query(schemas.ExampleKind.top),
    offset: int = Query(0, ge=0, le=10**6),
    limit: int = Query(20, ge=1, le=500),
) -> DictJSON:
    return DictJSON(await read_connection(request, queries.examples, sae, index, kind, offset, limit))


@router.get(
    "/search",
    response_model=schemas.SearchResult,
    summary="Features whose top contexts peak on a token containing q, and features whose explanations match q by meaning",
    responses=NOT_MODIFIED,
)
async def search(
    request: Request,
    q: str = Query(..., min_length=1, max_length=100, pattern=NO_NUL),
    sae: str | None = Query(None, max_length=200, pattern=NO_NUL),
    limit: int = Query(50, ge=1, le=500),
) -> DictJSON:
    await request.app.state.meaning.ready()  # the embedding model, if it is still loading since start-up
    return DictJSON(await read_connection(request, queries.search, q, sae, limit))
