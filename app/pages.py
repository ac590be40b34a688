"""HTML pages. Full pages render on first load; htmx requests (HX-Request header) get the fragment alone.
Each handler does its queries and renders its template in one read of the store (`deps.read_connection`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Connection

from . import queries, schemas
from .annotations import store as annotation_store
from .deps import read_connection
from .render import templates

router = APIRouter(include_in_schema=False)
FIRST_EXAMPLES = 10  # top contexts in the first paint; the rest load on demand
PAGE = 50
SaeName = Path(max_length=200)
FeatureIndex = Path(ge=0, le=2**31 - 1)


def _is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


@router.get("/")
async def home(request: Request) -> Response:
    def render(conn: Connection) -> Response:
        return templates.TemplateResponse(request, "home.html", {"models": queries.list_models(conn)})

    return await read_connection(request, render)


@router.get("/saes/{sae}")
async def sae_page(
    request: Request,
    sae: str = SaeName,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(PAGE, ge=1, le=500),
    sort: queries.SortKey = Query("index"),
    order: Literal["asc", "desc"] = Query("asc"),
    filter: queries.Filter = Query("all"),
) -> Response:
    def render(conn: Connection) -> Response:
        page = queries.feature_page(conn, sae, offset, limit, sort, order, filter)
        labels = annotation_store.labels(conn, sae, [f.index for f in page.features])  # the team's labels (issue 31)
        ctx = {"sae": queries.sae_detail(conn, sae), "page": page, "sort": sort, "order": order, "filter": filter, "labels": labels}
        return templates.TemplateResponse(request, "_feature_table.html" if _is_htmx(request) else "sae.html", ctx)

    return await read_connection(request, render)


@router.get("/saes/{sae}/jump")
async def jump(request: Request, sae: str = SaeName, index: int = Query(..., ge=0, le=2**31 - 1)) -> RedirectResponse:
    await read_connection(request, queries.feature_ref, sae, index)  # 404 page for an index out of range
    return RedirectResponse(f"/saes/{sae}/features/{index}", status_code=303)


@router.get("/saes/{sae}/features/{index}")
async def feature_page(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> Response:
    def render(conn: Connection) -> Response:
        view = queries.feature_view(conn, sae, index, schemas.ExampleKind.top, 0, FIRST_EXAMPLES)
        return templates.TemplateResponse(
            request,
            "feature.html",
            {"f": view.feature, "top": view.examples, "sae": sae, "mined_tokens": view.mined_tokens, "vocab": view.vocab},
        )

    return await read_connection(request, render)


@router.get("/saes/{sae}/features/{index}/examples")
async def examples_fragment(
    request: Request,
    sae: str = SaeName,
    index: int = FeatureIndex,
    kind: schemas.ExampleKind = Query(schemas.ExampleKind.top),
    offset: int = Query(0, ge=0, le=10**6),
    limit: int = Query(FIRST_EXAMPLES, ge=1, le=500),
) -> Response:
    def render(conn: Connection) -> Response:
        view = queries.feature_view(conn, sae, index, kind, offset, limit)
        ctx = {"page": view.examples, "sae": sae, "index": index, "f": view.feature, "vocab": view.vocab}
        return templates.TemplateResponse(request, "_examples.html", ctx)

    return await read_connection(request, render)


@router.get("/search")
async def search_page(request: Request, q: str = Query("", max_length=100), sae: str | None = Query(None, max_length=200)) -> Response:
    if q:
        await request.app.state.meaning.ready()  # the embedding model, if it is still loading since start-up

    def render(conn: Connection) -> Response:
        result = queries.search(conn, q, sae, 100) if q else None
        return templates.TemplateResponse(
            request, "search.html", {"q": q, "sae": sae, "result": result, "saes": [x for m in queries.list_models(conn) for x in m.saes]}
        )

    return await read_connection(request, render)


@router.get("/{sae}/{index}")
async def short_permalink(sae: str = SaeName, index: int = FeatureIndex) -> RedirectResponse:
    """The short permalink /{sae}/{index} (docs/concepts.md), kept stable by redirecting to the full one."""
    return RedirectResponse(f"/saes/{sae}/features/{index}", status_code=307)
