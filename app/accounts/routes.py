"""The account pages (sign-in, your keys, the admin's users and usage) and the account API under /api/v1.

Mounted only with accounts on (`saescope serve --auth`): the anonymous atlas's pages and OpenAPI document
stay as they were. Every state-changing route here needs a signed-in user (require_role) and, when it rides
on the session cookie, the CSRF token the middleware checks.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Query, Request, Security
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from markupsafe import Markup
from pydantic import BaseModel, Field

from ..render import templates
from ..schemas import Problem
from . import passwords, store
from .middleware import LOGIN_PATH, Accounts
from .roles import ROLES, Principal, Role, current_user, require_role
from .sessions import CSRF_FIELD, Session, new_login_session

pages = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api/v1", tags=["accounts"])
bearer = HTTPBearer(auto_error=False, description="a personal API key: `saescope key add USER` or the account page")
MAX_ID = 2**31 - 1


def accounts(request: Request) -> Accounts:
    return request.app.state.accounts


def session_of(request: Request) -> Session:
    return request.scope["state"]["session"]


def csrf_field(request: Request) -> Markup:
    """The hidden form field with this session's CSRF token, for forms on pages that are not cached."""
    token = session_of(request).csrf()
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, token)


def account_nav(request: Request) -> Markup:
    """What base.html puts in the top bar with accounts on: a placeholder htmx fills from /account/nav (the
    pages themselves are the same for everyone, so they stay cacheable) and the script that adds the CSRF
    token to htmx requests and forms."""
    acc = getattr(request.app.state, "accounts", None)
    if acc is None or not acc.config.auth:
        return Markup("")
    return Markup(
        '<script src="/static/accounts.js" defer></script>'
        '<span class="account-nav" hx-get="/account/nav" hx-trigger="load" hx-swap="outerHTML"></span>'
    )


templates.env.globals["account_nav"] = account_nav
templates.env.globals["csrf_field"] = csrf_field


def _page(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
    context = {"user": current_user(request), "oidc": accounts(request).oidc, **context}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["cache-control"] = "no-store"
    return response


def _local(target: str | None) -> str:
    """`next` if it is a path on this site, else "/" (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or urlsplit(target).netloc:
        return "/"
    return target


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else "never"


templates.env.filters["when"] = _when


# ---------------------------------------------------------------------- signing in and out


@pages.get("/account/nav")
async def nav(request: Request) -> HTMLResponse:
    session_of(request).csrf()  # the CSRF cookie every later form and htmx request needs
    here = urlsplit(request.headers.get("hx-current-url", "/"))
    return _page(request, "accounts/_nav.html", {"next": _local(here.path + (f"?{here.query}" if here.query else ""))})


@pages.get(LOGIN_PATH)
async def login_page(request: Request, next: str = Query("/", max_length=2000)) -> HTMLResponse:
    return _page(request, "accounts/login.html", {"next": _local(next), "error": None})


@pages.post(LOGIN_PATH)
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    acc = accounts(request)
    cfg = acc.config
    address = request.client.host if request.client else "unknown"
    retry = await acc.write(store.hit, f"addr:{address}", "login", cfg.login_per_minute)
    if retry is not None:
        response = _page(
            request,
            "accounts/login.html",
            {"next": _local(next), "error": "Too many sign-in attempts from your address: wait a minute."},
            429,
        )
        response.headers["retry-after"] = str(int(retry + 0.999))
        return response
    who = await acc.read(store.login_candidate, username.strip())
    if who.locked_for > 0:
        minutes = max(1, round(who.locked_for / 60))
        response = _page(
            request,
            "accounts/login.html",
            {"next": _local(next), "error": f"This account is locked after repeated failed sign-ins: try again in {minutes} min."},
            429,
        )
        response.headers["retry-after"] = str(int(who.locked_for + 0.999))
        return response
    ok = await passwords.verify_async(who.password_hash, password)
    if not ok or who.user_id is None or who.password_hash is None:
        error = "Wrong username or password."
        if who.user_id is not None and await acc.write(store.record_failure, who.user_id, cfg.login_failures, cfg.lockout_minutes):
            error = f"Wrong password, {cfg.login_failures} times: the account is locked for {cfg.lockout_minutes:g} min."
        # 200: the form again, with the reason (a 401 would need a WWW-Authenticate challenge a form cannot answer)
        return _page(request, "accounts/login.html", {"next": _local(next), "error": error})
    await acc.write(store.record_success, who.user_id, password, who.password_hash)
    new_login_session(session_of(request), who.user_id, who.epoch)
    return RedirectResponse(_local(next), status_code=303)


@pages.get("/account/oidc")
async def oidc_start(request: Request, next: str = Query("/", max_length=2000)) -> Response:
    """Off to the OIDC provider; it sends the browser back to /account/oidc/callback."""
    oidc = accounts(request).oidc
    if oidc is None:
        raise HTTPException(404, "this server has no single sign-on (serve --oidc-issuer ...)")
    session_of(request)["n"] = _local(next)
    return await oidc.client.authorize_redirect(request, str(request.url_for("oidc_callback")))


@pages.get("/account/oidc/callback", name="oidc_callback")
async def oidc_callback(request: Request) -> Response:
    from authlib.integrations.base_client import OAuthError

    acc = accounts(request)
    if acc.oidc is None:
        raise HTTPException(404, "this server has no single sign-on")
    session = session_of(request)
    target = _local(session.pop("n", "/"))
    try:
        token = await acc.oidc.client.authorize_access_token(request)
    except OAuthError as exc:
        return _page(
            request,
            "accounts/login.html",
            {"next": target, "error": f"{acc.oidc.name} did not sign you in: {exc.description or exc.error}"},
        )
    claims = token.get("userinfo") or {}
    if not claims.get("sub") or not claims.get("iss"):
        return _page(request, "accounts/login.html", {"next": target, "error": f"{acc.oidc.name} sent no identity"})
    name = claims.get("preferred_username") or (claims.get("email") or "").split("@")[0] or claims["sub"]
    found = await acc.write(store.oidc_user, claims["iss"], claims["sub"], str(name), acc.oidc.new_user_role)
    if found is None:
        error = f"{acc.oidc.name} knows you, but this atlas has no account for you (or it is disabled): ask an admin."
        return _page(request, "accounts/login.html", {"next": target, "error": error})
    new_login_session(session, *found)
    return RedirectResponse(target, status_code=303)


@pages.post("/account/logout")
async def logout(request: Request, user: Principal = Depends(require_role("viewer"))) -> RedirectResponse:
    """Sign out: ends every session of the user (a signed cookie cannot be taken back one by one, so the
    user's session epoch moves on and every cookie of the old one is refused)."""
    await accounts(request).write(store.end_sessions, user.user_id)
    session_of(request).replace()
    session_of(request).csrf()
    return RedirectResponse("/", status_code=303)


# ---------------------------------------------------------------------- your account and keys


async def _account_page(
    request: Request, user: Principal, new_key: str | None = None, message: str | None = None, status: int = 200
) -> HTMLResponse:
    keys = await accounts(request).read(store.list_keys, user.user_id)
    return _page(request, "accounts/account.html", {"keys": keys, "new_key": new_key, "message": message}, status)


@pages.get("/account")
async def account_page(request: Request, user: Principal = Depends(require_role("viewer"))) -> HTMLResponse:
    return await _account_page(request, user)


@pages.post("/account/keys")
async def create_key_page(
    request: Request, name: Annotated[str, Form(max_length=100)] = "", user: Principal = Depends(require_role("viewer"))
) -> HTMLResponse:
    key, _ = await accounts(request).write(store.add_key, user.user_id, name)
    return await _account_page(request, user, new_key=key)  # shown this once: it is not stored


@pages.post("/account/keys/{key_id}/revoke")
async def revoke_key_page(
    request: Request, key_id: int = Path(ge=1, le=MAX_ID), user: Principal = Depends(require_role("viewer"))
) -> RedirectResponse:
    if not await accounts(request).write(store.revoke_key, key_id, user.user_id):
        raise HTTPException(404, f"you have no API key {key_id} that is still valid")
    return RedirectResponse("/account", status_code=303)


@pages.post("/account/password")
async def change_password(
    request: Request,
    current: Annotated[str, Form(max_length=1024)] = "",
    new: Annotated[str, Form(max_length=1024)] = "",
    user: Principal = Depends(require_role("viewer")),
) -> Response:
    acc = accounts(request)
    who = await acc.read(store.login_candidate, user.username)
    if not await passwords.verify_async(who.password_hash, current):
        return await _account_page(request, user, message="The current password is wrong.", status=403)
    try:
        await acc.write(store.set_password, user.username, new)
    except store.AccountError as exc:
        return await _account_page(request, user, message=str(exc), status=422)
    fresh = await acc.read(store.login_candidate, user.username)  # every other session of the user has ended
    new_login_session(session_of(request), user.user_id, fresh.epoch)
    return RedirectResponse("/account", status_code=303)


# ---------------------------------------------------------------------- the admin's pages


@pages.get("/admin/users")
async def admin_users(
    request: Request, days: int = Query(7, ge=1, le=366), user: Principal = Depends(require_role("admin"))
) -> HTMLResponse:
    return await _admin_page(request, days)


async def _admin_page(request: Request, days: int = 7, message: str | None = None, status: int = 200) -> HTMLResponse:
    acc = accounts(request)
    users = await acc.read(store.list_users)
    use = await acc.read(store.usage, days)
    return _page(
        request,
        "accounts/admin.html",
        {"users": users, "usage": use, "days": days, "roles": ROLES, "message": message, "now": store.utcnow()},
        status,
    )


@pages.post("/admin/users")
async def admin_add_user(
    request: Request,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    role: Annotated[str, Form(max_length=16)] = "viewer",
    user: Principal = Depends(require_role("admin")),
) -> Response:
    try:
        await accounts(request).write(store.add_user, username, password, role)
    except (store.AccountError, ValueError) as exc:
        return await _admin_page(request, message=str(exc), status=422)
    return RedirectResponse("/admin/users", status_code=303)


@pages.post("/admin/users/{username}")
async def admin_change_user(
    request: Request,
    username: str = Path(max_length=64),
    role: Annotated[str, Form(max_length=16)] = "",
    disabled: Annotated[str, Form(max_length=8)] = "",
    user: Principal = Depends(require_role("admin")),
) -> Response:
    acc = accounts(request)
    try:
        if role:
            await acc.write(store.set_role, username, role)
        if disabled in ("0", "1"):
            if username == user.username and disabled == "1":
                raise store.AccountError("you cannot disable yourself")
            await acc.write(store.set_disabled, username, disabled == "1")
    except (store.AccountError, ValueError) as exc:
        return await _admin_page(request, message=str(exc), status=422)
    return RedirectResponse("/admin/users", status_code=303)


# ---------------------------------------------------------------------- API


class Me(BaseModel):
    username: str
    role: Role
    via: str = Field(description="session (a signed-in browser) or key (Authorization: Bearer)")
    key_id: int | None = Field(description="the API key this request came with")


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class NewKey(BaseModel):
    name: str = Field("key", min_length=1, max_length=100)


class CreatedKey(KeyOut):
    key: str = Field(description="the key itself: shown this once, stored only as its SHA-256")


class UsageOut(BaseModel):
    subject: str = Field(description="key:ID, user:ID or addr:ADDRESS")
    who: str
    bucket: str = Field(description="live: model requests; login: sign-in attempts")
    requests: int
    refused: int = Field(description="answered 429")
    last_day: str


NEEDS_USER: dict[int | str, dict] = {
    401: {"model": Problem, "description": "Not signed in and no API key, or an unknown or revoked key"},
    403: {"model": Problem, "description": "The account's role does not allow this"},
}


def _key_out(k: store.KeyRow) -> dict:
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": k.created_at,
        "last_used_at": k.last_used_at,
        "revoked_at": k.revoked_at,
    }


@api.get("/me", response_model=Me, responses=NEEDS_USER, dependencies=[Security(bearer)])
async def me(user: Principal = Depends(require_role("viewer"))) -> dict:
    """Who this request runs as."""
    return {"username": user.username, "role": user.role, "via": user.via, "key_id": user.key_id}


@api.get("/keys", response_model=list[KeyOut], responses=NEEDS_USER, dependencies=[Security(bearer)])
async def my_keys(request: Request, user: Principal = Depends(require_role("viewer"))) -> list[dict]:
    """Your API keys, revoked ones included (never the keys themselves)."""
    return [_key_out(k) for k in await accounts(request).read(store.list_keys, user.user_id)]


@api.post(
    "/keys",
    response_model=CreatedKey,
    status_code=201,
    responses={**NEEDS_USER, 400: {"model": Problem, "description": "The body is not JSON"}},
    dependencies=[Security(bearer)],
)
async def create_key(request: Request, body: NewKey, user: Principal = Depends(require_role("viewer"))) -> dict:
    """A new API key for you; the answer's `key` is shown this once."""
    key, row = await accounts(request).write(store.add_key, user.user_id, body.name)
    return {**_key_out(row), "key": key}


@api.delete(
    "/keys/{key_id}",
    status_code=204,
    responses={**NEEDS_USER, 404: {"model": Problem, "description": "You have no such key that is still valid"}},
    dependencies=[Security(bearer)],
)
async def revoke_key(request: Request, key_id: int = Path(ge=1, le=MAX_ID), user: Principal = Depends(require_role("viewer"))) -> Response:
    """Revoke one of your keys: it is refused from the next request on."""
    if not await accounts(request).write(store.revoke_key, key_id, user.user_id):
        raise HTTPException(404, f"you have no API key {key_id} that is still valid")
    return Response(status_code=204)


@api.get("/usage", response_model=list[UsageOut], responses=NEEDS_USER, dependencies=[Security(bearer)])
async def usage_api(request: Request, days: int = Query(7, ge=1, le=366), user: Principal = Depends(require_role("admin"))) -> list[dict]:
    """Model requests (and sign-in attempts) per key, user and address over the last `days` days (admins only)."""
    return [u.__dict__ for u in await accounts(request).read(store.usage, days)]
