"""The accounts middleware: who is asking, CSRF, and the fair-use limits on the model, before any route runs.

Per request (ASGI, outermost but for nothing):
1. Who: with accounts on, `Authorization: Bearer <key>` (an unknown or revoked key is 401 at once, never
   an anonymous fallback), else the signed session cookie (its user read from the store: disabled users and
   ended sessions count for nothing). The answer is `current_user(request)`.
2. Visitors who are not signed in: with --anonymous none, pages redirect to the sign-in page and the API
   answers 401; otherwise they read as before.
3. CSRF: a state-changing request (not GET/HEAD/OPTIONS) that rides on the session cookie, and every
   sign-in, must carry the session's token in X-CSRF-Token or a `csrf_token` form field (sessions.py);
   requests with a key carry no ambient credential and need none.
4. The model: POST routes of app/live* (activations, steering, what comes later there) count against the
   caller's quota: the key's, the signed-in user's, or the address's if not signed in; past it, 429 with
   Retry-After. Counters live in the store (store.hit), so every worker process shares them. The live
   model's bounded queue (503) stays the last line behind this. The feature-list pages, GETs that run the
   model for their activations, count the same way through `model_quota` and `Accounts.charge`
   (app/annotations/activations.py).
With accounts off and no per-address limit, it passes every request straight through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qs, quote

import anyio
from sqlalchemy import Engine
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sae_core.config import AuthConfig

from ..deps import Reader
from ..http import SECURITY_HEADERS
from . import store
from .roles import Principal
from .sessions import CSRF_COOKIE, CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, Codec, Session, csrf_ok, secret_key

T = TypeVar("T")
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOGIN_PATH = "/account/login"
# What a visitor who is not signed in may still reach under --anonymous none
OPEN_PATHS = (LOGIN_PATH, "/account/nav", "/account/oidc", "/account/oidc/callback", "/api/v1/health", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
MAX_FORM_BYTES = 1 << 20  # a form read for its CSRF field (the live pages' texts are at most 20,000 characters)
KEY_TOUCH_S = 60  # last_used_at is written at most once a minute per key


NO_ANONYMOUS_MODEL = "the model is for signed-in users and API keys here"


@dataclass(frozen=True)
class Quota:
    """Whose model use a request counts against, and that client's requests per minute (0: no limit)."""

    subject: str  # key:N, user:N or addr:HOST (store.hit's subject)
    limit: int
    counted: bool  # with accounts off and no per-address limit nothing is counted (the anonymous demo)

    def refusal(self) -> str:
        who = "this API key" if self.subject.startswith("key:") else "your address" if self.subject.startswith("addr:") else "your account"
        return f"{who} has used its {self.limit} model requests this minute"


def model_quota(cfg: AuthConfig, principal: Principal | None, client: str) -> Quota | None:
    """The quota a model request runs under; None where it may not run at all (accounts on, not signed in,
    and --anonymous is not live). The live POST routes and the list pages' activations share it."""
    if principal is None and cfg.auth and cfg.anonymous != "live":
        return None
    if principal is not None:
        return Quota(principal.subject, cfg.live_per_minute, True)
    return Quota(f"addr:{client}", cfg.live_per_minute_address, cfg.auth or cfg.live_per_minute_address > 0)


class Accounts:
    """app.state.accounts: the settings, the store and the session codec the middleware and the routes share."""

    def __init__(self, config: AuthConfig, engine: Engine, reader: Reader):
        self.config = config
        self.engine = engine
        self.reader = reader
        self.codec = Codec(secret_key(), config.session_hours * 3600) if config.auth else None
        self.oidc = None
        if config.auth and config.oidc_issuer:
            from .oidc import OIDC

            self.oidc = OIDC(config)
        self._model_routes: list | None = None
        self._allowed: list | None = None

    @property
    def active(self) -> bool:
        """Whether the middleware has anything to do."""
        return self.config.auth or self.config.live_per_minute_address > 0

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        return await self.reader.read(work, *args)

    async def write(self, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in a write transaction, in a worker thread (SQLite may wait for its writer lock)."""
        return await anyio.to_thread.run_sync(partial(self._write, work, *args))

    def _write(self, work: Callable[..., T], *args: Any) -> T:
        with store.transaction(self.engine) as conn:
            return work(conn, *args)

    async def charge(self, quota: Quota) -> float | None:
        """Count one model request against `quota` (in the store, so every worker shares the counts): the
        seconds until its window ends if it is past the limit, else None."""
        if not quota.counted:
            return None
        return await self.write(store.hit, quota.subject, "live", quota.limit)

    def is_model_route(self, app: Any, path: str) -> bool:
        """A POST route defined in app/live (or its package): each call runs the model."""
        if self._model_routes is None:
            self._model_routes = [compile_path(r.path)[0] for r in model_routes(app)]
        return any(regex.match(path) for regex in self._model_routes)

    def allow_all(self, app: Any, path: str, headers: list) -> list:
        """A 405's Allow with the methods of every route at `path`: the router names only the first route's,
        and the account API has two routes on /api/v1/keys (GET and POST)."""
        if self._allowed is None:
            self._allowed = [(compile_path(r.path)[0], r.methods or set()) for r in routes(app) if r.path]
        methods = set().union(*(m for regex, m in self._allowed if regex.match(path)))
        if not methods:
            return headers
        if "GET" in methods:
            methods.add("HEAD")
        order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        allow = ", ".join(sorted(methods, key=lambda m: order.index(m) if m in order else len(order))).encode()
        return [(k, v) for k, v in headers if k.lower() != b"allow"] + [(b"allow", allow)]

    def cookies(self, session: Session, secure: bool) -> list[tuple[bytes, bytes]]:
        assert self.codec is not None
        age = int(self.config.session_hours * 3600)
        flags = f"Path=/; Max-Age={age}; SameSite=Lax" + ("; Secure" if secure else "")
        return [
            (b"set-cookie", f"{SESSION_COOKIE}={self.codec.dump(session)}; {flags}; HttpOnly".encode("latin-1")),
            (b"set-cookie", f"{CSRF_COOKIE}={session.get('c', '')}; {flags}".encode("latin-1")),
        ]


def routes(app: Any) -> list:
    """Every route of the app, routers included into it walked (FastAPI >= 0.16x keeps them as included
    routers; older ones as flat routes)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def model_routes(app: Any) -> list:
    """The POST routes of app/live (activations, steering, what comes later there): each call runs the model."""
    return [
        r for r in routes(app) if "POST" in (r.methods or ()) and r.path and getattr(r.endpoint, "__module__", "").startswith("app.live")
    ]


class AccountsMiddleware:
    def __init__(self, app: ASGIApp, accounts: Accounts):
        self.app = app
        self.accounts = accounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        acc = self.accounts
        if scope["type"] != "http" or not acc.active:
            return await self.app(scope, receive, send)
        cfg = acc.config
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        state = scope.setdefault("state", {})
        principal: Principal | None = None
        session = Session()
        cookies = cookie_parser(headers.get("cookie", ""))
        if cfg.auth:
            assert acc.codec is not None
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                found = await acc.read(store.user_for_key, auth[7:].strip())
                if found is None:
                    return await _refuse(
                        scope, send, 401, "the API key is unknown or revoked", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
                    )
                principal, last_used = found
                if last_used is None or (store.utcnow() - last_used).total_seconds() > KEY_TOUCH_S:
                    await acc.write(store.touch_key, principal.key_id)
            else:
                session = acc.codec.load(cookies.get(SESSION_COOKIE))
                if "u" in session:
                    principal = await acc.read(store.user_for_session, int(session["u"]), int(session.get("e", -1)))
                    if principal is None:  # the user was disabled, or their sessions ended: an anonymous session now
                        session.replace(c=session.get("c") or Session().csrf())
            state["session"] = session
            scope["session"] = session  # request.session, as Starlette's SessionMiddleware would give it (Authlib uses it)
            state["principal"] = principal

            if principal is None and cfg.anonymous == "none" and not _open(path):
                if path.startswith("/api/"):
                    return await _refuse(
                        scope, send, 401, "sign in or send an API key (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"}
                    )
                if method in SAFE_METHODS:
                    target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
                    return await _redirect(send, f"{LOGIN_PATH}?next={quote(target, safe='')}")
                return await _refuse(scope, send, 401, "sign in first")

            if method not in SAFE_METHODS and (principal is None or principal.via != "key"):
                if SESSION_COOKIE in cookies or path == LOGIN_PATH:
                    token = headers.get(CSRF_HEADER)
                    if token is None:
                        body, token = await _form_token(receive, headers)
                        if body is None:
                            return await _refuse(scope, send, 413, "the form is too large")
                        receive = _replay(body, receive)
                    if not csrf_ok(session, token):
                        return await _refuse(scope, send, 403, "the CSRF token is missing or wrong: reload the page and try again")

        if method == "POST" and acc.is_model_route(scope["app"], path):
            quota = model_quota(cfg, principal, (scope.get("client") or ("unknown",))[0])
            if quota is None:
                return await _refuse(scope, send, 401, NO_ANONYMOUS_MODEL, {"WWW-Authenticate": "Bearer"})
            retry = await acc.charge(quota)
            if retry is not None:
                return await _refuse(scope, send, 429, quota.refusal(), {"Retry-After": str(int(retry + 0.999))})

        if not cfg.auth:
            return await self.app(scope, receive, send)
        secure = cfg.cookie_secure == "always" or (cfg.cookie_secure == "auto" and scope.get("scheme") == "https")
        private = cfg.anonymous == "none"

        async def send_with_session(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 405:
                    message["headers"] = acc.allow_all(scope["app"], path, message.get("headers", []))
                extra = acc.cookies(session, secure) if session.modified else []
                out = [
                    (k, b"private, max-age=0" if private and k == b"cache-control" and v.startswith(b"public") else v)
                    for k, v in message.get("headers", [])
                ]
                if extra:
                    out = [(k, v) for k, v in out if k != b"cache-control"] + [(b"cache-control", b"no-store"), *extra]
                message["headers"] = out
            await send(message)

        await self.app(scope, receive, send_with_session)


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _form_token(receive: Receive, headers: Headers) -> tuple[bytes | None, str | None]:
    """The request's whole body (to hand on) and its `csrf_token` field if it is a URL-encoded form."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return body, None
    values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get(CSRF_FIELD)
    return body, values[0] if values else None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(scope: Scope, send: Send, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
    """JSON for the API; for htmx, the card the live pages show errors in (HTTP 200, so that htmx swaps it
    in; its data-status says the refusal); else the error page."""
    from ..render import templates

    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()] + [(b"cache-control", b"no-store"), *SECURITY_HEADERS]
    req_headers = Headers(scope=scope)
    if scope["path"].startswith("/api/") or "text/html" not in req_headers.get("accept", "text/html") and not req_headers.get("hx-request"):
        body = json.dumps({"detail": reason}, separators=(",", ":")).encode()
        ctype = b"application/json"
    else:
        from starlette.requests import Request

        request = Request(scope)
        retry = (headers or {}).get("Retry-After")
        if req_headers.get("hx-request") == "true":
            page = templates.get_template("_live_error.html").render(status=status, reason=reason, retry=float(retry) if retry else None)
            status = 200
        else:
            title = {401: "Sign in first", 403: "Forbidden", 413: "Too large", 429: "Too many requests"}.get(status, "Refused")
            page = templates.get_template("error.html").render(request=request, status=status, title=title, reason=reason)
        body, ctype = page.encode(), b"text/html; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode("latin-1")),
                (b"content-length", b"0"),
                (b"cache-control", b"no-store"),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
