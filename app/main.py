"""The feature browser: `create_app(url)` builds the FastAPI app over a store; `saescope serve` runs it.

The app only reads the store. It refuses to start on a database whose schema is not this code's
(the message names `saescope db upgrade`). Each request reads in one transaction, i.e. one snapshot.
"""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from sae_core.store import db

from . import api, deps, pages, queries
from .render import templates

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"


def create_app(url: str | None = None) -> FastAPI:
    engine = db.open_store(url)          # raises SchemaOutOfDate / SaescopeError before anything is served
    factory = sessionmaker(engine, expire_on_commit=False)
    app = FastAPI(title="saescope", version="1", description="Browse sparse-autoencoder features: pages and a REST API under /api/v1.",
                  docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.session_factory = factory
    app.state.reader = deps.Reader(engine, deps.db_threads(engine))     # where reads run: see deps.db_threads
    app.state.schema_revision = db.head_revision()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(api.router)

    @app.get("/docs", include_in_schema=False)
    def docs():
        if (STATIC / "vendor" / "swagger-ui" / "swagger-ui-bundle.js").exists():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="saescope API",
                                       swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
                                       swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css", swagger_favicon_url="")
        return HTMLResponse('<p>Swagger UI is not installed here (<code>make venv</code> fetches it). '
                            'The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>; docs/api.md describes every endpoint.</p>')

    app.include_router(pages.router)

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    @app.exception_handler(queries.NotFound)
    async def not_found(request: Request, exc: queries.NotFound):
        if wants_json(request):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return templates.TemplateResponse(request, "error.html", {"status": 404, "title": "Not found", "reason": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        reasons = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        if wants_json(request):
            return JSONResponse({"detail": reasons}, status_code=422)
        return templates.TemplateResponse(request, "error.html", {"status": 422, "title": "Invalid request", "reason": "; ".join(reasons)},
                                          status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if wants_json(request) or exc.status_code not in (404, 405):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "title": "Not found",
                                          "reason": f"there is no page at {request.url.path}"}, status_code=exc.status_code)

    # Objects that live as long as the process (modules, templates, the app; later each vocabulary, see
    # queries.VocabCache) go to the collector's permanent generation: otherwise every full collection
    # walks them: a 70 ms pause every few hundred page requests, stalling every queued request.
    gc.freeze()
    return app
