"""The feature browser: `create_app(url)` builds the FastAPI app over a store; `saescope serve` runs it
(app/serving.py).

The app only reads the store. It refuses to start on a database whose schema is not this code's
(the message names `saescope db upgrade`). Each request reads in one transaction, i.e. one snapshot
(app/deps.py).

create_app is a list of steps, each a short function below: the app's state, its routers (in order:
pages.router's `/{sae}/{index}` catch-all comes last), its error pages, its middleware (innermost
first) and the start-up warm-up (`lifespan`). A new area of the app adds its routers to ROUTERS or
its own step to create_app.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from sae_core.config import LiveConfig
from sae_core.errors import NotFound
from sae_core.store import db

from . import accounts, api, compare, deps, families, feature_map, graph_groups, graphs, live, pages, schemas
from . import annotations as notes  # not `annotations`: the name is taken by `from __future__ import annotations`
from .config import AppConfig
from .http import HeadAsGet, HTTPPolicy, RefuseNul
from .meaning_search import MeaningWarmUp
from .render import templates
from .response_cache import GZIP_LEVEL, MIN_COMPRESS, ResponseCache
from .store_watch import StoreWatch

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"
# Swagger UI without FastAPI's inline start-up script, which the Content-Security-Policy refuses.
SWAGGER_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>saescope API</title>
<link rel="icon" href="/static/favicon.svg"><link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css"></head>
<body><div id="swagger-ui"></div><script src="/static/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/swagger-init.js"></script></body></html>"""


def create_app(url: str | None = None, live_config: LiveConfig | None = None, *, config: AppConfig | None = None) -> FastAPI:
    """The app over the store at `url`, or as `config` says (what `saescope serve` gives each worker).
    `live_config` starts a model process owned by this app (tests, embedding); without it and without
    `config` the live features are off."""
    if config is None:
        config = AppConfig.resolve(url, live=live_config)
    elif url is not None or live_config is not None:
        raise TypeError("create_app takes a config, or a url and live_config, not both")
    app = FastAPI(
        title="saescope",
        version="1",
        description="Browse sparse-autoencoder features: pages and a REST API under /api/v1.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # every route can answer it: http.RefuseNul refuses a NUL in any path or query before routing
        responses={400: {"model": schemas.Problem, "description": "A NUL character in the path or query"}},
    )
    open_store(app, config)  # raises SchemaOutOfDate / SaescopeError before anything is served
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_routers(app, config)
    add_error_pages(app)
    add_middleware(app, config)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At start-up, what the first users would otherwise wait for starts loading in the background: the
    embedding model of search by meaning (app/meaning_search.py) and the live model (the model process this app
    owns, if any; `saescope serve` starts its one before the workers). Pages answer meanwhile."""
    app.state.meaning.start(app.state.reader)
    try:
        async with live.lifespan(app):  # starts and stops the model process this app owns, if any
            yield
    finally:  # a stopped app holds no database connection: its listener, its reader's, its pool's
        app.state.store_watch.close()
        app.state.reader.close()


def open_store(app: FastAPI, config: AppConfig) -> None:
    """The store and what reads it: app.state.engine, .reader (where reads run, see deps.db_threads),
    .store_watch (the live runs ETags are made of), .schema_revision, .meaning (search's warm-up)."""
    engine = db.open_store(config.db_url)
    app.state.config = config
    app.state.engine = engine
    app.state.reader = deps.Reader(engine, deps.db_threads(engine, config.db_threads))
    app.state.store_watch = StoreWatch(app.state.reader)
    app.state.schema_revision = db.head_revision()
    app.state.meaning = MeaningWarmUp()


# The areas' routers, matched in this order after the REST API's and the live features' (each area
# keeps its API and pages in its own module). pages.router comes after them all: its /{sae}/{index}
# short permalink would catch two-segment paths of theirs.
ROUTERS: list[APIRouter] = [
    feature_map.api_router,  # the map: /api/v1/saes/{sae}/map
    feature_map.router,  # /saes/{sae}/map and its data, the feature page's inset
    families.api_router,  # a feature's relatives across SAEs (saescope family)
    families.router,
    compare.api_router,  # SAEs of one model and hook side by side: /api/v1/compare
    compare.router,  # /compare
    graph_groups.api_router,  # suggested supernodes: /api/v1/graphs/{slug}/supernodes
    graphs.api_router,  # attribution graphs stored by `saescope trace`: /api/v1/graphs
    graphs.router,  # /graphs and /graphs/{slug}
]


def add_routers(app: FastAPI, config: AppConfig) -> None:
    app.include_router(api.router)
    live.install(app, config.db_url, config.live)  # the live API and pages, app.state.live
    for router in ROUTERS:
        app.include_router(router)
    app.add_api_route("/docs", docs_page, include_in_schema=False)
    accounts.install(app, config.auth)  # app.state.accounts; with --auth the account pages and API
    notes.install(app, config.auth)  # annotations and feature lists: reads always, writes with --auth
    app.include_router(pages.router)  # last: see ROUTERS


def docs_page() -> HTMLResponse:
    if (STATIC / "vendor" / "swagger-ui" / "swagger-ui-bundle.js").exists():
        return HTMLResponse(SWAGGER_PAGE)
    return HTMLResponse(
        "<p>Swagger UI is not installed here (<code>make venv</code> fetches it). "
        'The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>; docs/api.md describes every endpoint.</p>'
    )


# ---------------------------------------------------------------------- error pages


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_page(request: Request, status: int, title: str, reason: str, headers: Mapping[str, str] | None = None) -> Response:
    return templates.TemplateResponse(
        request, "error.html", {"status": status, "title": title, "reason": reason}, status_code=status, headers=headers
    )


async def not_found(request: Request, exc: NotFound) -> Response:
    if wants_json(request):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return error_page(request, 404, "Not found", str(exc))


async def invalid(request: Request, exc: RequestValidationError) -> Response:
    errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    if wants_json(request):  # FastAPI's documented HTTPValidationError shape: loc names the parameter
        return JSONResponse({"detail": errors}, status_code=422)
    reasons = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errors)
    return error_page(request, 422, "Invalid request", reasons)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    headers = getattr(exc, "headers", None)  # 405 carries Allow (RFC 9110)
    if wants_json(request) or exc.status_code not in (404, 405):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
    if exc.status_code == 404:
        return error_page(request, 404, "Not found", f"there is no page at {request.url.path}", headers)
    return error_page(request, 405, "Method not allowed", f"{request.method} is not allowed at {request.url.path}", headers)


ERROR_PAGES: dict[type[Exception], Callable] = {NotFound: not_found, RequestValidationError: invalid, StarletteHTTPException: http_error}


def add_error_pages(app: FastAPI) -> None:
    """JSON under /api/, an HTML error page elsewhere (the live errors' statuses: app/live/api.py)."""
    for exc, handler in ERROR_PAGES.items():
        app.add_exception_handler(exc, handler)


# ---------------------------------------------------------------------- middleware


def add_middleware(app: FastAPI, config: AppConfig) -> None:
    """Innermost first: each add_middleware wraps everything added before it. HTTPPolicy (security
    headers, ETags, the response cache) sits right around the routes; a layer that decides who may see
    a response belongs outside it, so that a cached answer is never served past it."""
    limit = config.response_cache_mb << 20
    app.state.response_cache = ResponseCache(limit) if limit else None  # rendered store reads (app/response_cache.py)
    app.add_middleware(HTTPPolicy, watch=app.state.store_watch, schema_revision=app.state.schema_revision, cache=app.state.response_cache)
    # gzip for what HTTPPolicy does not cache (static files, /docs, the OpenAPI document, errors);
    # it leaves alone a response that already carries a Content-Encoding.
    app.add_middleware(GZipMiddleware, minimum_size=MIN_COMPRESS, compresslevel=GZIP_LEVEL)
    # Who is asking (sessions, API keys), CSRF and the model's fair-use limits: outside the response cache.
    accounts.add_middleware(app)
    # Outside all of the above: HEAD runs as GET through everything above, so its headers are exactly the GET's.
    app.add_middleware(HeadAsGet)
    app.add_middleware(RefuseNul)  # before anything reads the path or query (PostgreSQL takes no NUL in text)
