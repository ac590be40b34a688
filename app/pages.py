"""HTML pages. Full pages render on first load; htmx requests (HX-Request header) get the fragment alone."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from . import queries, schemas
from .deps import session
from .render import templates

router = APIRouter(include_in_schema=False)
FIRST_EXAMPLES = 10          # top contexts in the first paint; the rest load on demand
PAGE = 50


def _is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


@router.get("/")
def home(request: Request, s: Session = Depends(session)):
    return templates.TemplateResponse(request, "home.html", {"models": queries.list_models(s)})


@router.get("/saes/{sae}")
def sae_page(request: Request, sae: str = Path(max_length=200),
             offset: int = Query(0, ge=0, le=10**9), limit: int = Query(PAGE, ge=1, le=500),
             sort: queries.SortKey = Query("index"), order: Literal["asc", "desc"] = Query("asc"),
             filter: queries.Filter = Query("all"), s: Session = Depends(session)):
    page = queries.feature_page(s, sae, offset, limit, sort, order, filter)
    ctx = {"sae": queries.sae_detail(s, sae), "page": page, "sort": sort, "order": order, "filter": filter}
    return templates.TemplateResponse(request, "_feature_table.html" if _is_htmx(request) else "sae.html", ctx)


@router.get("/saes/{sae}/jump")
def jump(sae: str = Path(max_length=200), index: int = Query(..., ge=0, le=2**31 - 1), s: Session = Depends(session)):
    queries.get_feature(s, sae, index)      # 404 page for an index out of range
    return RedirectResponse(f"/saes/{sae}/features/{index}", status_code=303)


@router.get("/saes/{sae}/features/{index}")
def feature_page(request: Request, sae: str = Path(max_length=200), index: int = Path(ge=0, le=2**31 - 1),
                 s: Session = Depends(session)):
    feature = queries.feature_detail(s, sae, index)
    top = queries.examples(s, sae, index, schemas.ExampleKind.top, 0, FIRST_EXAMPLES)
    _, run, _ = queries.get_sae(s, sae)
    return templates.TemplateResponse(request, "feature.html", {"f": feature, "top": top, "sae": sae, "mined_tokens": run.tokens})


@router.get("/saes/{sae}/features/{index}/examples")
def examples_fragment(request: Request, sae: str = Path(max_length=200), index: int = Path(ge=0, le=2**31 - 1),
                      kind: schemas.ExampleKind = Query(schemas.ExampleKind.top), offset: int = Query(0, ge=0, le=10**6),
                      limit: int = Query(FIRST_EXAMPLES, ge=1, le=500), s: Session = Depends(session)):
    page = queries.examples(s, sae, index, kind, offset, limit)
    feature = queries.feature_detail(s, sae, index)
    return templates.TemplateResponse(request, "_examples.html", {"page": page, "sae": sae, "index": index, "f": feature})


@router.get("/search")
def search_page(request: Request, q: str = Query("", max_length=100), sae: str | None = Query(None, max_length=200),
                s: Session = Depends(session)):
    result = queries.search(s, q, sae, 100) if q else None
    return templates.TemplateResponse(request, "search.html", {"q": q, "sae": sae, "result": result,
                                      "saes": [x for m in queries.list_models(s) for x in m.saes]})


@router.get("/{sae}/{index}")
def short_permalink(sae: str = Path(max_length=200), index: int = Path(ge=0, le=2**31 - 1)):
    """The short permalink /{sae}/{index} of DESIGN §5, kept stable by redirecting to the full one."""
    return RedirectResponse(f"/saes/{sae}/features/{index}", status_code=307)
