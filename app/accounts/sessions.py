"""Signed session cookies and the CSRF token they carry.

The session is a cookie signed with itsdangerous (HMAC-SHA1 over a timestamped payload; nothing is kept
server-side but the user's session epoch): {"u": user id, "e": the user's session epoch, "c": CSRF token}.
It is HttpOnly and SameSite=Lax, and Secure when the request came over HTTPS (config.cookie_secure).
A second cookie, readable by scripts, holds the same CSRF token: static/accounts.js copies it into the
X-CSRF-Token header of every htmx request, and forms carry it as a hidden field. A state-changing request
is accepted only when that token equals the one inside the signed session (signed double submit): a
page on another site can neither read the token nor forge a session that holds one.

The signing key: $SAESCOPE_SECRET_KEY, else `secret_key` in the data directory, created on first use
(0600; every worker process of a server reads the same file).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from sae_core import settings
from sae_core.errors import SaescopeError

ENV_SECRET = "SAESCOPE_SECRET_KEY"
SESSION_COOKIE = "saescope_session"
CSRF_COOKIE = "saescope_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


def secret_key(path: Path | None = None) -> str:
    """The key sessions are signed with; see the module's docstring."""
    if env := os.environ.get(ENV_SECRET):
        if len(env) < 32:
            raise SaescopeError(
                f"{ENV_SECRET} must be at least 32 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        return env
    path = path or settings.home() / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # atomic, and fails if another process made it first: then theirs is the key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        raise SaescopeError(f"{path} is readable by other users: `chmod 600 {path}`")
    key = path.read_text().strip()
    if len(key) < 32:
        raise SaescopeError(f"{path} holds too short a key; delete it to have a new one made")
    return key


class Session(dict):
    """The session's contents; `modified` tells the middleware to send a new cookie. It is also the
    request's `request.session` (Starlette's interface), where Authlib keeps an OIDC sign-in's state."""

    modified = False

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.modified = True

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.modified = True

    def pop(self, key: str, *default: Any) -> Any:
        self.modified = self.modified or key in self
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self.modified = True

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self.modified = True
        return super().setdefault(key, default)

    def clear(self) -> None:
        super().clear()
        self.modified = True

    def replace(self, **values: Any) -> None:
        self.clear()
        self.update(values)

    def csrf(self) -> str:
        """This session's CSRF token, made now if it has none."""
        if "c" not in self:
            self["c"] = secrets.token_urlsafe(24)
        return self["c"]


class Codec:
    def __init__(self, key: str, max_age_s: float):
        self.serializer = URLSafeTimedSerializer(key, salt="saescope-session")
        self.max_age_s = int(max_age_s)

    def load(self, cookie: str | None) -> Session:
        if not cookie:
            return Session()
        try:
            data = self.serializer.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # a forged, altered or expired cookie: a fresh, empty session
            return Session()
        return Session(data) if isinstance(data, dict) else Session()  # dict(...) construction leaves `modified` False

    def dump(self, session: Session) -> str:
        return self.serializer.dumps(dict(session))


def csrf_ok(session: Session, token: str | None) -> bool:
    expected = session.get("c")
    return bool(expected and token) and hmac.compare_digest(str(expected), str(token))


def new_login_session(session: Session, user_id: int, epoch: int) -> None:
    """A new session for the user who just signed in, with a new CSRF token (what an attacker planted before is void)."""
    session.replace(u=user_id, e=epoch, c=secrets.token_urlsafe(24))
