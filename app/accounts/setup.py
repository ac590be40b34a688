"""Wiring the accounts into the app: `install(app, config)` with the routers, `add_middleware(app)` with the middleware."""

from __future__ import annotations

from fastapi import FastAPI

from sae_core.config import AuthConfig

from .middleware import Accounts, AccountsMiddleware, model_routes


def install(app: FastAPI, config: AuthConfig) -> None:
    """The accounts' state (app.state.accounts) and, with config.auth, their pages and API; create_app calls
    it after opening the store and before pages.router (whose /{sae}/{index} would catch /account/nav).
    The OpenAPI document then also says what the middleware may answer (the bearer scheme; 401 and 429 on
    the model's endpoints)."""
    accounts = Accounts(config, app.state.engine, app.state.reader)
    app.state.accounts = accounts
    if config.auth:
        from . import routes

        app.include_router(routes.api)
        app.include_router(routes.pages)
    if accounts.active:
        _document_limits(app, accounts)


def add_middleware(app: FastAPI) -> None:
    """The accounts middleware, outside HTTPPolicy (a cached answer is never served past it)."""
    app.add_middleware(AccountsMiddleware, accounts=app.state.accounts)


def _document_limits(app: FastAPI, accounts: Accounts) -> None:
    """Add the refusals the middleware may answer to the model endpoints' documented responses."""
    base = app.openapi
    cfg = accounts.config

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        problem = {"$ref": "#/components/schemas/Problem"}
        for route in model_routes(app):
            op = schema["paths"].get(route.path, {}).get("post")
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            responses["429"] = {
                "description": "Past the model requests per minute of this key, account or address: retry after Retry-After seconds",
                "headers": {"Retry-After": {"description": "seconds until the client's window ends", "schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": problem}},
            }
            if cfg.auth:
                responses["401"] = {
                    "description": "An unknown or revoked API key, or (unless the server lets visitors use the model) no key",
                    "content": {"application/json": {"schema": problem}},
                }
                op["security"] = [{"HTTPBearer": []}] if cfg.anonymous != "live" else [{}, {"HTTPBearer": []}]
        if cfg.auth:
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes.setdefault("HTTPBearer", {"type": "http", "scheme": "bearer", "description": "a personal API key"})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
