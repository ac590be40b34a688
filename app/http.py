"""HTTP behaviour shared by every response: security headers, and conditional requests for shared links.

Security: a Content-Security-Policy that lets a page load only our own scripts, styles and images
(no inline script, event handler or style anywhere: token highlighting is a class, htmx is told not
to eval or run swapped-in scripts), plus nosniff, a Referrer-Policy and a frame ban.

Caching: a mined run never changes, so a page or API answer is a function of the request, the SAE's
live run and revision (bumped by explanations and metrics written later) and this code. Its ETag is
derived from exactly those, taken *before* the handler runs (app/store_watch.py keeps them in the
process and knows when the store changed): if a re-mine lands in between, the client gets new
content under the old tag and simply fetches it again next time; it is never served stale content
under a new tag.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sae_core

from .response_cache import Entry, ResponseCache, accepts_gzip, gzip_entry
from .store_watch import RunRow, StoreWatch

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
# Fresh for a minute, then revalidated (a 304 costs one small query); a shared cache may answer with
# the stale copy for 5 more minutes while it revalidates, so a link opened by a whole room stays fast.
CACHE_CONTROL = b"public, max-age=60, stale-while-revalidate=300"
NO_STORE = b"no-store"
# GET paths whose answers are pure functions of the store's live runs; the others (static files have
# their own validators, /docs, /openapi.json, health, redirects) are left alone.
_SAE_PATH = re.compile(r"^/(?:api/v1/)?saes/([^/]+)")
_STORE_PATHS = {"/", "/search", "/api/v1/models", "/api/v1/saes", "/api/v1/search"}
VARY = b"HX-Request, Accept-Encoding"  # the SAE page answers htmx with the table fragment alone; gzip or not


@lru_cache(maxsize=1)
def code_version() -> str:
    """The app's version plus a digest of its templates and code, so a deploy that changes what a page
    looks like changes every ETag even without a version bump."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(sae_core.__version__.encode())
    for path in sorted([*root.rglob("*.py"), *(root.parent / "templates").rglob("*.html")]):  # app/live/, app/accounts/ too
        h.update(str(path.relative_to(root.parent)).encode() + path.read_bytes())
    return f"{sae_core.__version__}+{h.hexdigest()[:12]}"


def etag(runs: list[RunRow], path: str, query: bytes, htmx: bool, schema_revision: str) -> str:
    h = hashlib.sha256(repr((code_version(), schema_revision, runs, path, query, htmx)).encode())
    return f'"{h.hexdigest()[:32]}"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    """Whether If-None-Match names `tag`, in either representation (identity or gzip)."""
    if not if_none_match:
        return False
    candidates = {t.strip().removeprefix("W/").replace('-gz"', '"') for t in if_none_match.split(",")}
    return tag in candidates or "*" in candidates


def _gzip_tag(tag: str) -> str:
    """The gzip representation's own strong validator (RFC 9110: each representation has its own)."""
    return tag[:-1] + '-gz"'


def _scope_of(path: str) -> tuple[bool, str | None]:
    """(cacheable, SAE name it depends on; None: on every SAE)."""
    if m := _SAE_PATH.match(path):
        if path.endswith(("/jump", "/sweep")):  # the sweep page shows a sweep once it is stored: not a function of the runs
            return False, None
        return True, unquote(m.group(1))
    return path in _STORE_PATHS, None


class HTTPPolicy:
    """ASGI middleware: security headers on every response; on store reads, ETag / 304 / Cache-Control
    and the rendered-response cache (app/response_cache.py), gzip included."""

    def __init__(self, app: ASGIApp, watch: StoreWatch, schema_revision: str, cache: ResponseCache | None = None):
        self.app, self.watch, self.schema_revision, self.cache = app, watch, schema_revision, cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        cacheable, sae_name = _scope_of(path) if scope["method"] == "GET" else (False, None)  # HEAD arrives as GET (HeadAsGet)
        if not cacheable:
            return await self.app(scope, receive, self._with_headers(send, path))
        headers = Headers(scope=scope)
        runs = await self.watch.runs(sae_name)
        tag = etag(runs, path, scope.get("query_string", b""), headers.get("hx-request") == "true", self.schema_revision)
        gz = accepts_gzip(headers.get("accept-encoding"))
        if _matches(headers.get("if-none-match"), tag):
            await send({"type": "http.response.start", "status": 304, "headers": self._validators(_gzip_tag(tag) if gz else tag)})
            await send({"type": "http.response.body", "body": b""})
            return
        if self.cache is None and not gz:
            return await self.app(scope, receive, self._with_headers(send, path, tag))
        key = (tag, gz)
        entry = self.cache.get(key) if self.cache is not None else None
        state = b"hit"
        if entry is None:
            state = b"miss"
            status, app_headers, body = await self._render(scope, receive)
            if status != 200:  # errors are neither cached nor validated
                await self._with_headers(send, path)({"type": "http.response.start", "status": status, "headers": app_headers})
                await send({"type": "http.response.body", "body": body})
                return
            entry = gzip_entry(app_headers, body) if gz else Entry(app_headers, body)
            if self.cache is not None:
                self.cache.put(key, entry)
        gzipped = any(k == b"content-encoding" for k, _ in entry.headers)
        out_headers = [*entry.headers, *self._validators(_gzip_tag(tag) if gzipped else tag), (b"x-saescope-cache", state)]
        await send({"type": "http.response.start", "status": 200, "headers": out_headers})
        await send({"type": "http.response.body", "body": entry.body})

    def _validators(self, tag: str) -> list[tuple[bytes, bytes]]:
        return [(b"etag", tag.encode()), (b"cache-control", CACHE_CONTROL), (b"vary", VARY), *SECURITY_HEADERS]

    async def _render(self, scope: Scope, receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Run the app and collect its whole response (store reads are small and never streamed)."""
        start: dict = {}
        chunks: list[bytes] = []

        async def collect(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        return start["status"], list(start.get("headers", [])), b"".join(chunks)

    def _with_headers(self, send: Send, path: str, tag: str | None = None) -> Send:
        """`send` with the security headers (and for a 200 of a store read, its validators) added."""

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                if tag is not None and message["status"] == 200:
                    extra = self._validators(tag)
                else:
                    extra = list(SECURITY_HEADERS)
                    if path == "/api/v1/health" or message["status"] >= 400:
                        extra.append((b"cache-control", NO_STORE))  # an error or a liveness answer may change any moment
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        return send_with_headers


class HeadAsGet:
    """ASGI middleware, outermost: HEAD is answered on every path that answers GET (RFC 9110 §9.3.2),
    with the very status and headers the GET gets (ETag, Content-Length, Content-Encoding, caching) and
    no body. Link checkers, proxies and chat apps' link previews send HEAD; FastAPI's routes accept only
    the methods they were declared with, so the request runs as a GET and its body is dropped here: a
    route added later gets HEAD without saying so. 405 answers name HEAD wherever they name GET."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] != "HEAD":
            return await self.app(scope, receive, _allow_head_on_405(send))

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await _allow_head_on_405(send)(message)

        # A copy: the server keeps its own scope saying HEAD, and so writes no body after these headers.
        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _allow_head_on_405(send: Send) -> Send:
    async def send_with_head(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 405:
            message["headers"] = [(k, _with_head(v) if k.lower() == b"allow" else v) for k, v in message.get("headers", [])]
        await send(message)

    return send_with_head


def _with_head(allow: bytes) -> bytes:
    methods = [m.strip() for m in allow.decode("latin-1").split(",") if m.strip()]
    if "GET" in methods and "HEAD" not in methods:
        methods.insert(methods.index("GET") + 1, "HEAD")
    return ", ".join(methods).encode("latin-1")


class RefuseNul:
    """ASGI middleware, outermost: a request whose path or query holds a NUL character is answered 400
    here. PostgreSQL stores no NUL in text, so such a value reached the store as a 500 (the search API's
    `q`, any SAE name); no name, query or text of ours holds one, so nothing is lost by refusing it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            body = b'{"detail":"NUL characters are not accepted in a path or query"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
