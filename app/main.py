"""The feature browser: `create_app(url)` builds the FastAPI app over a store; `saescope serve` runs it.

The app only reads the store. It refuses to start on a database whose schema is not this code's
(the message names `saescope db upgrade`). Each request reads in one transaction, i.e. one snapshot.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from sae_core.config import LiveConfig
from sae_core.store import db

from . import api, deps, families, feature_map, live, pages, queries
from .http import HeadAsGet, HTTPPolicy
from .render import templates
from .response_cache import GZIP_LEVEL, MIN_COMPRESS, ResponseCache, cache_bytes_from_env
from .meaning_search import MeaningWarmUp
from .store_watch import StoreWatch

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"
# Swagger UI without FastAPI's inline start-up script, which the Content-Security-Policy refuses.
SWAGGER_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>saescope API</title>
<link rel="icon" href="/static/favicon.svg"><link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css"></head>
<body><div id="swagger-ui"></div><script src="/static/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/swagger-init.js"></script></body></html>"""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At start-up, what the first users would otherwise wait for starts loading in the background: the
    embedding model of search by meaning (app/meaning_search.py) and the live model (the model process this app
    owns, if any; `saescope serve` starts its one before the workers). Pages answer meanwhile."""
    app.state.meaning.start(app.state.engine)
    async with live.lifespan(app):  # starts and stops the model process this app owns, if any
        yield


def create_app(url: str | None = None, live_config: LiveConfig | None = None) -> FastAPI:
    """The app over the store at `url`. `live_config` starts a model process owned by this app (tests, embedding);
    without it the live features are what `saescope serve` set up for its workers (app/live.py)."""
    engine = db.open_store(url)  # raises SchemaOutOfDate / SaescopeError before anything is served
    factory = sessionmaker(engine, expire_on_commit=False)
    app = FastAPI(
        title="saescope",
        version="1",
        description="Browse sparse-autoencoder features: pages and a REST API under /api/v1.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.session_factory = factory
    app.state.reader = deps.Reader(engine, deps.db_threads(engine))  # where reads run: see deps.db_threads
    app.state.schema_revision = db.head_revision()
    app.state.meaning = MeaningWarmUp()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(api.router)
    live.install(app, db.database_url(url), live_config)
    app.include_router(live.router)  # before pages.router and its /{sae}/{index} catch-all
    app.include_router(feature_map.api_router)  # the map: /api/v1/saes/{sae}/map
    app.include_router(feature_map.router)  # /saes/{sae}/map and its data, the feature page's inset
    app.include_router(families.api_router)  # a feature's relatives across SAEs (saescope family)
    app.include_router(families.router)

    @app.get("/docs", include_in_schema=False)
    def docs():
        if (STATIC / "vendor" / "swagger-ui" / "swagger-ui-bundle.js").exists():
            return HTMLResponse(SWAGGER_PAGE)
        return HTMLResponse(
            "<p>Swagger UI is not installed here (<code>make venv</code> fetches it). "
            'The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>; docs/api.md describes every endpoint.</p>'
        )

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
        errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        if wants_json(request):  # FastAPI's documented HTTPValidationError shape: loc names the parameter
            return JSONResponse({"detail": errors}, status_code=422)
        reasons = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errors)
        return templates.TemplateResponse(
            request, "error.html", {"status": 422, "title": "Invalid request", "reason": reasons}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)  # 405 carries Allow (RFC 9110)
        if wants_json(request) or exc.status_code not in (404, 405):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        title, reason = (
            ("Not found", f"there is no page at {request.url.path}")
            if exc.status_code == 404
            else ("Method not allowed", f"{request.method} is not allowed at {request.url.path}")
        )
        return templates.TemplateResponse(
            request,
            "error.html",
            {"status": exc.status_code, "title": title, "reason": reason},
            status_code=exc.status_code,
            headers=headers,
        )

    limit = cache_bytes_from_env()
    app.state.response_cache = ResponseCache(limit) if limit else None  # rendered store reads (app/response_cache.py)
    app.state.store_watch = StoreWatch(app.state.reader)  # the live runs ETags are made of, kept in process
    app.add_middleware(HTTPPolicy, watch=app.state.store_watch, schema_revision=app.state.schema_revision, cache=app.state.response_cache)
    # gzip for what HTTPPolicy does not cache (static files, /docs, the OpenAPI document, errors);
    # it leaves alone a response that already carries a Content-Encoding.
    app.add_middleware(GZipMiddleware, minimum_size=MIN_COMPRESS, compresslevel=GZIP_LEVEL)
    # Outermost: HEAD runs as GET through everything above, so its headers are exactly the GET's.
    app.add_middleware(HeadAsGet)

    # Objects that live as long as the process (modules, templates, the app; later each vocabulary, see
    # queries.VocabCache) go to the collector's permanent generation: otherwise every full collection
    # walks them: a 70 ms pause every few hundred page requests, stalling every queued request.
    gc.freeze()
    return app
