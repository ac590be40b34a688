"""The annotation and feature-list endpoints: the REST API under /api/v1 and the pages.

Reads (`read_api`, `read_pages`) are mounted always: the anonymous demo shows annotations, read-only, and a
list shared by link opens for anyone. Writes (`write_api`, `write_pages`) and the signed-in pages are
mounted with accounts on; each needs the editor role (require_role) and, on the session cookie, the CSRF
token the accounts middleware checks. A list someone else keeps private answers 404, as a list that does
not exist (no telling which ids are taken)."""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Form, HTTPException, Path, Query, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from sae_core.errors import NotFound, SaescopeError

from .. import queries
from ..accounts import Principal, current_user, require_role
from ..accounts.routes import NEEDS_USER, bearer
from ..accounts.store import transaction
from ..api import FeatureIndex, SaeName
from ..render import heat, templates
from ..schemas import Problem
from . import activations, markdown, store

log = logging.getLogger("saescope.annotations")
# app.http.RefuseNul answers 400 to a NUL character in the path or query, before any route
NUL_REFUSED: dict[int | str, dict] = {
    400: {"model": Problem, "description": "A NUL character in the path or query, or a body that is not JSON"}
}
read_api = APIRouter(prefix="/api/v1", tags=["annotations"], responses=NUL_REFUSED)
write_api = APIRouter(prefix="/api/v1", tags=["annotations"], dependencies=[Security(bearer)], responses=NUL_REFUSED)
read_pages = APIRouter(include_in_schema=False)
write_pages = APIRouter(include_in_schema=False)
MAX_ID = 2**31 - 1
NO_NUL = r"^[^\x00]*$"  # PostgreSQL stores no NUL character in text
ListId = Path(ge=1, le=MAX_ID, description="the list's id")
Token = Path(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="the list's public link token")
NOT_FOUND: dict[int | str, dict] = {404: {"model": Problem, "description": "No such SAE, feature, annotation or list (that you can see)"}}
UNPROCESSABLE: dict[int | str, dict] = {
    422: {
        "description": "Invalid input: the fields' errors, or what the store refused (an empty label, too many entries...)",
        "content": {
            "application/json": {
                "schema": {"anyOf": [{"$ref": "#/components/schemas/HTTPValidationError"}, {"$ref": "#/components/schemas/Problem"}]}
            }
        },
    },
}
editor = require_role("editor")
viewer = require_role("viewer")


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else "never"


templates.env.filters["ann_when"] = _when
templates.env.filters["markdown"] = markdown.render
templates.env.filters["heat"] = heat


async def _read(request: Request, work: Any, *args: Any) -> Any:
    return await request.app.state.reader.read(work, *args)


async def _write(request: Request, work: Any, *args: Any) -> Any:
    def run() -> Any:
        with transaction(request.app.state.engine) as conn:
            return work(conn, *args)

    try:
        return await anyio.to_thread.run_sync(run)
    except store.AnnotationError as exc:
        raise HTTPException(422, str(exc)) from exc


def _embed(label: str, note: str) -> bytes | None:
    """The annotation embedded with the explanations' model, for search by meaning; None where that model is
    not installed (search then finds annotations by full text alone)."""
    try:
        from sae_core.explain.embed import embedder, pack

        return pack(embedder().encode([f"{label}. {note[:2000]}"]))[0]
    except (SaescopeError, OSError, ImportError) as exc:
        log.info("annotation not embedded: %s", exc)
        return None


def _query_vector(query: str) -> Any:
    try:
        from ..meaning_search import query_vector

        return query_vector(query)
    except (SaescopeError, OSError, ImportError):
        return None


# ---------------------------------------------------------------------- schemas


class AnnotationIn(BaseModel):
    label: str = Field(min_length=1, pattern=NO_NUL, max_length=store.MAX_LABEL, description="a short name for the feature")
    note: str = Field(
        "", pattern=NO_NUL, max_length=markdown.MAX_NOTE, description="Markdown; rendered to sanitised HTML (raw HTML is shown as text)"
    )


class AnnotationOut(BaseModel):
    sae: str
    index: int
    label: str
    note: str
    note_html: str = Field(description="the note rendered and sanitised (markdown-it-py, then nh3)")
    author: str | None = Field(description="who wrote the latest revision")
    created_at: datetime
    updated_at: datetime
    revisions: int
    examples_changed_at: datetime | None = Field(
        description="when the SAE's active mining run finished, if after the note was written: its examples are newer than the note"
    )


class RevisionOut(BaseModel):
    label: str
    note: str
    author: str | None
    created_at: datetime


class AnnotationHitOut(BaseModel):
    annotation: AnnotationOut
    score: float = Field(description="reciprocal-rank fusion of the full-text and semantic ranks")
    full_text_rank: int | None
    semantic_rank: int | None


class EntryIO(BaseModel):
    sae: str = Field(min_length=1, pattern=NO_NUL, max_length=200)
    index: int = Field(ge=0, le=MAX_ID)
    note: str = Field("", pattern=NO_NUL, max_length=markdown.MAX_NOTE)


Visibility = Literal["private", "team", "link"]


class ListIn(BaseModel):
    name: str = Field(min_length=1, pattern=NO_NUL, max_length=store.MAX_LABEL)
    description: str = Field("", pattern=NO_NUL, max_length=markdown.MAX_NOTE)
    visibility: Visibility = Field("private", description="private: you; team: every signed-in user; link: anyone with its link")
    common_text: str = Field(
        "", pattern=NO_NUL, max_length=2000, description="the text every entry's activation is shown on (live runtime)"
    )
    entries: list[EntryIO] = Field([], max_length=store.MAX_ENTRIES)


class ListOut(BaseModel):
    id: int
    owner: str
    name: str
    description: str
    visibility: Visibility
    common_text: str
    created_at: datetime
    updated_at: datetime
    entries: list[EntryIO]
    share_path: str | None = Field(None, description="the public link (only to the owner)")


class ListSummary(BaseModel):
    id: int
    name: str
    visibility: Visibility
    owner: str
    updated_at: datetime
    entries: int


class ListExport(BaseModel):
    """What `export?format=json` writes and `POST /api/v1/lists/import` reads."""

    format: Literal["saescope.feature_list"] = "saescope.feature_list"
    version: Literal[1] = 1
    name: str = Field(min_length=1, pattern=NO_NUL, max_length=store.MAX_LABEL)
    description: str = Field("", pattern=NO_NUL, max_length=markdown.MAX_NOTE)
    common_text: str = Field("", pattern=NO_NUL, max_length=2000)
    entries: list[EntryIO] = Field([], max_length=store.MAX_ENTRIES)


def _entries(items: list[EntryIO]) -> list[store.Entry]:
    return [store.Entry(e.sae, e.index, e.note) for e in items]


def _list_out(view: store.ListView, user: Principal | None) -> dict:
    return view.as_dict(with_token=user is not None and user.user_id == view.owner_id)


# ---------------------------------------------------------------------- annotations: API


@read_api.get("/saes/{sae}/features/{index}/annotation", response_model=AnnotationOut, responses=NOT_FOUND)
async def annotation_api(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> dict:
    """The feature's annotation (label, note as Markdown and as sanitised HTML, author, times)."""
    view = await _read(request, store.get_annotation, sae, index)
    if view is None:
        raise HTTPException(404, f"{sae} #{index} has no annotation")
    return view.as_dict()


@read_api.get("/saes/{sae}/features/{index}/annotation/history", response_model=list[RevisionOut], responses=NOT_FOUND)
async def annotation_history_api(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> list[dict]:
    """Every revision of the feature's annotation, newest first (empty: never annotated)."""
    return await _read(request, store.history, sae, index)


@read_api.get("/saes/{sae}/annotations", response_model=list[AnnotationOut], responses=NOT_FOUND)
async def sae_annotations_api(request: Request, sae: str = SaeName) -> list[dict]:
    """Every annotated feature of the SAE, by index."""
    return [v.as_dict() for v in await _read(request, store.sae_annotations, sae)]


@read_api.get("/annotations/search", response_model=list[AnnotationHitOut], responses=NOT_FOUND)
async def annotation_search_api(
    request: Request,
    q: str = Query(min_length=1, max_length=500, description="words or a phrase"),
    sae: str | None = Query(None, max_length=200, description="only this SAE's annotations"),
    limit: int = Query(20, ge=1, le=100),
) -> list[dict]:
    """Annotations by full text and by meaning (the label and note embedded like explanations), fused by rank."""
    hits = await _read(request, store.search, q, _query_vector, sae, limit)
    return [
        {"annotation": h.view.as_dict(), "score": h.score, "full_text_rank": h.full_text_rank, "semantic_rank": h.semantic_rank}
        for h in hits
    ]


@write_api.put(
    "/saes/{sae}/features/{index}/annotation",
    response_model=AnnotationOut,
    responses={**NEEDS_USER, **NOT_FOUND, **UNPROCESSABLE},
)
async def annotate_api(
    request: Request, body: AnnotationIn, sae: str = SaeName, index: int = FeatureIndex, user: Principal = Depends(editor)
) -> dict:
    """Give the feature a label and a note (editors); the previous text stays in its history."""
    embedding = await anyio.to_thread.run_sync(_embed, body.label, body.note)
    view = await _write(request, store.set_annotation, sae, index, body.label, body.note, user.user_id, embedding)
    return view.as_dict()


# ---------------------------------------------------------------------- feature lists: API


@write_api.get("/lists", response_model=list[ListSummary], responses=NEEDS_USER)
async def lists_api(request: Request, user: Principal = Depends(viewer)) -> list[dict]:
    """Your feature lists and your team's."""
    return await _read(request, store.lists_for, user.user_id)


@write_api.post("/lists", response_model=ListOut, status_code=201, responses={**NEEDS_USER, **NOT_FOUND, **UNPROCESSABLE})
async def create_list_api(request: Request, body: ListIn, user: Principal = Depends(editor)) -> dict:
    """A new feature list of yours."""
    list_id = await _write(
        request, store.create_list, user.user_id, body.name, body.description, body.visibility, body.common_text, _entries(body.entries)
    )
    return _list_out(await _read(request, store.get_list, list_id, user.user_id), user)


@write_api.post("/lists/import", response_model=ListOut, status_code=201, responses={**NEEDS_USER, **NOT_FOUND, **UNPROCESSABLE})
async def import_list_api(request: Request, body: ListExport, user: Principal = Depends(editor)) -> dict:
    """A new private list from an export (format saescope.feature_list, version 1)."""
    list_id = await _write(
        request, store.create_list, user.user_id, body.name, body.description, "private", body.common_text, _entries(body.entries)
    )
    return _list_out(await _read(request, store.get_list, list_id, user.user_id), user)


@write_api.get("/lists/{list_id:int}", response_model=ListOut, responses={**NEEDS_USER, **NOT_FOUND})
async def list_api(request: Request, list_id: int = ListId, user: Principal = Depends(viewer)) -> dict:
    """A list of yours or your team's."""
    return _list_out(await _read(request, store.get_list, list_id, user.user_id), user)


@write_api.put("/lists/{list_id:int}", response_model=ListOut, responses={**NEEDS_USER, **NOT_FOUND, **UNPROCESSABLE})
async def update_list_api(request: Request, body: ListIn, list_id: int = ListId, user: Principal = Depends(editor)) -> dict:
    """Replace your list: its fields and its entries, in the order given."""
    await _write(
        request,
        store.update_list,
        list_id,
        user.user_id,
        body.name,
        body.description,
        body.visibility,
        body.common_text,
        _entries(body.entries),
    )
    return _list_out(await _read(request, store.get_list, list_id, user.user_id), user)


@write_api.delete("/lists/{list_id:int}", status_code=204, responses={**NEEDS_USER, **NOT_FOUND})
async def delete_list_api(request: Request, list_id: int = ListId, user: Principal = Depends(editor)) -> Response:
    """Delete your list."""
    await _write(request, store.delete_list, list_id, user.user_id)
    return Response(status_code=204)


def _export(view: store.ListView, fmt: str) -> Response:
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in view.name)[:60] or "list"  # a header is latin-1
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["position", "sae", "index", "note"])
        for i, e in enumerate(view.entries):
            writer.writerow([i, e.sae, e.index, e.note])
        return Response(
            out.getvalue(), media_type="text/csv; charset=utf-8", headers={"content-disposition": f'attachment; filename="{stem}.csv"'}
        )
    body = ListExport(
        name=view.name,
        description=view.description,
        common_text=view.common_text,
        entries=[EntryIO(sae=e.sae, index=e.index, note=e.note) for e in view.entries],
    )
    return JSONResponse(json.loads(body.model_dump_json()), headers={"content-disposition": f'attachment; filename="{stem}.json"'})


EXPORT_RESPONSES: dict[int | str, dict] = {
    200: {"model": ListExport, "description": "JSON (what import reads) or CSV", "content": {"text/csv": {"schema": {"type": "string"}}}}
}


@write_api.get("/lists/{list_id:int}/export", response_class=Response, responses={**EXPORT_RESPONSES, **NEEDS_USER, **NOT_FOUND})
async def export_list_api(
    request: Request, list_id: int = ListId, format: Literal["json", "csv"] = Query("json"), user: Principal = Depends(viewer)
) -> Response:
    """The list as JSON (what import reads) or CSV (position, sae, index, note)."""
    return _export(await _read(request, store.get_list, list_id, user.user_id), format)


@read_api.get("/lists/shared/{token}", response_model=ListOut, responses=NOT_FOUND)
async def shared_list_api(request: Request, token: str = Token) -> dict:
    """A list shared by link: anyone with the link reads it."""
    return _list_out(await _read(request, store.shared_list, token), None)


@read_api.get("/lists/shared/{token}/export", response_class=Response, responses={**EXPORT_RESPONSES, **NOT_FOUND})
async def export_shared_api(request: Request, token: str = Token, format: Literal["json", "csv"] = Query("json")) -> Response:
    """A list shared by link, as JSON or CSV."""
    return _export(await _read(request, store.shared_list, token), format)


# ---------------------------------------------------------------------- pages


def _fragment(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, {"user": current_user(request), **context}, status_code=status)
    response.headers["cache-control"] = "no-store"  # who is asking changes what it shows (the edit form)
    return response


@read_pages.get("/saes/{sae}/features/{index}/annotation")
async def annotation_fragment(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> HTMLResponse:
    """The feature page's annotation (htmx): the same for everyone, so cached with the SAE's pages (an
    edit bumps the SAE's revision)."""
    view = await _read(request, store.get_annotation, sae, index)
    return templates.TemplateResponse(request, "_annotation.html", {"a": view, "sae": sae, "index": index})


@write_pages.get("/annotate/{sae}/{index}")
async def annotate_fragment(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> HTMLResponse:
    """The signed-in user's forms for one feature (htmx): the annotation form for an editor and a button per
    list of theirs to add the feature to; outside /saes/, so never in the shared response cache."""
    user = current_user(request)
    view = await _read(request, store.get_annotation, sae, index)
    lists = await _read(request, store.lists_for, user.user_id) if user is not None and user.can("editor") else []
    mine = [x for x in lists if user is not None and x["owner"] == user.username]
    return _fragment(request, "_annotate.html", {"a": view, "sae": sae, "index": index, "lists": mine})


@read_pages.get("/saes/{sae}/features/{index}/annotation/history")
async def annotation_history_page(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> HTMLResponse:
    revisions = await _read(request, store.history, sae, index)
    return _fragment(request, "lists/history.html", {"revisions": revisions, "sae": sae, "index": index})


@read_pages.get("/saes/{sae}/labels")
async def labels_fragment(request: Request, sae: str = SaeName) -> HTMLResponse:
    """The SAE page's list of annotated features (htmx)."""
    views = await _read(request, store.sae_annotations, sae)
    return _fragment(request, "lists/_labels.html", {"annotations": views, "sae": sae})


@read_pages.get("/annotations")
async def annotation_search_page(
    request: Request, q: str = Query("", max_length=500), sae: str | None = Query(None, max_length=200)
) -> HTMLResponse:
    hits = []
    if q.strip():
        hits = await _read(request, store.search, q, _query_vector, sae, 50)
    return _fragment(request, "lists/search.html", {"q": q, "hits": hits})


@write_pages.post("/saes/{sae}/features/{index}/annotation")
async def annotate_page(
    request: Request,
    label: Annotated[str, Form(max_length=store.MAX_LABEL)] = "",
    note: Annotated[str, Form(max_length=markdown.MAX_NOTE)] = "",
    sae: str = SaeName,
    index: int = FeatureIndex,
    user: Principal = Depends(editor),
) -> Response:
    embedding = await anyio.to_thread.run_sync(_embed, label, note)
    await _write(request, store.set_annotation, sae, index, label, note, user.user_id, embedding)
    return RedirectResponse(f"/saes/{sae}/features/{index}", status_code=303)


async def _list_page(request: Request, view: store.ListView, user: Principal | None) -> HTMLResponse:
    def details(conn: Any) -> list:
        rows: list[Any] = []
        for e in view.entries:
            try:
                rows.append(queries.feature_detail(conn, e.sae, e.index))
            except NotFound:
                rows.append(None)
        return rows

    features = await _read(request, details)
    # batched per SAE, cached, and metered like the live routes (activations.py says why)
    acts, live_error = await activations.list_activations(request, view, [f is not None for f in features])
    owner = user is not None and user.user_id == view.owner_id and user.can("editor")
    context = {"l": view, "features": features, "acts": acts, "live_error": live_error, "owner": owner}
    return _fragment(request, "lists/list.html", context)


@read_pages.get("/lists/shared/{token}")
async def shared_list_page(request: Request, token: str = Token) -> HTMLResponse:
    view = await _read(request, store.shared_list, token)
    return await _list_page(request, view, current_user(request))


@read_pages.get("/lists/shared/{token}/export.{fmt}")
async def shared_export_page(request: Request, token: str = Token, fmt: Literal["json", "csv"] = Path()) -> Response:
    return _export(await _read(request, store.shared_list, token), fmt)


@write_pages.get("/lists")
async def lists_page(request: Request, user: Principal = Depends(viewer)) -> HTMLResponse:
    lists = await _read(request, store.lists_for, user.user_id)
    return _fragment(request, "lists/index.html", {"lists": lists, "error": None})


@write_pages.post("/lists")
async def create_list_page(
    request: Request,
    name: Annotated[str, Form(max_length=store.MAX_LABEL)] = "",
    visibility: Annotated[str, Form(max_length=8)] = "private",
    user: Principal = Depends(editor),
) -> Response:
    list_id = await _write(request, store.create_list, user.user_id, name, "", visibility, "")
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@write_pages.get("/lists/{list_id:int}")
async def list_page(request: Request, list_id: int = ListId, user: Principal = Depends(viewer)) -> HTMLResponse:
    return await _list_page(request, await _read(request, store.get_list, list_id, user.user_id), user)


@write_pages.get("/lists/{list_id:int}/export.{fmt}")
async def export_page(
    request: Request, list_id: int = ListId, fmt: Literal["json", "csv"] = Path(), user: Principal = Depends(viewer)
) -> Response:
    return _export(await _read(request, store.get_list, list_id, user.user_id), fmt)


@write_pages.post("/lists/{list_id:int}")
async def update_list_page(
    request: Request,
    list_id: int = ListId,
    name: Annotated[str, Form(max_length=store.MAX_LABEL)] = "",
    description: Annotated[str, Form(max_length=markdown.MAX_NOTE)] = "",
    visibility: Annotated[str, Form(max_length=8)] = "private",
    common_text: Annotated[str, Form(max_length=2000)] = "",
    user: Principal = Depends(editor),
) -> Response:
    await _write(request, store.update_list, list_id, user.user_id, name, description, visibility, common_text, None)
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@write_pages.post("/lists/{list_id:int}/entries")
async def add_entry_page(
    request: Request,
    list_id: int = ListId,
    sae: Annotated[str, Form(max_length=200)] = "",
    index: Annotated[int, Form(ge=0, le=MAX_ID)] = 0,
    note: Annotated[str, Form(max_length=markdown.MAX_NOTE)] = "",
    user: Principal = Depends(editor),
) -> Response:
    await _write(request, store.add_entry, list_id, user.user_id, store.Entry(sae, index, note))
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@write_pages.post("/lists/{list_id:int}/entries/{position}/delete")
async def remove_entry_page(
    request: Request, list_id: int = ListId, position: int = Path(ge=0, le=store.MAX_ENTRIES), user: Principal = Depends(editor)
) -> Response:
    await _write(request, store.remove_entry, list_id, user.user_id, position)
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@write_pages.post("/lists/{list_id:int}/entries/{position}/move")
async def move_entry_page(
    request: Request,
    list_id: int = ListId,
    position: int = Path(ge=0, le=store.MAX_ENTRIES),
    to: Annotated[int, Form(ge=0, le=store.MAX_ENTRIES)] = 0,
    user: Principal = Depends(editor),
) -> Response:
    await _write(request, store.move_entry, list_id, user.user_id, position, to)
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@write_pages.post("/lists/{list_id:int}/delete")
async def delete_list_page(request: Request, list_id: int = ListId, user: Principal = Depends(editor)) -> Response:
    await _write(request, store.delete_list, list_id, user.user_id)
    return RedirectResponse("/lists", status_code=303)
