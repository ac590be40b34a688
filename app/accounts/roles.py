"""Who is asking: the principal a request runs as, the roles, and the checks routes declare.

    from app.accounts import current_user, require_role

    @router.post("/saes/{sae}/features/{index}/annotation")
    async def annotate(request: Request, user: Principal = Depends(require_role("editor"))): ...

`current_user(request)` is None for a visitor who is not signed in (and always while accounts are off);
`require_role(role)` answers 401 to them and 403 to a user below `role`. The middleware (middleware.py)
has already checked the CSRF token of every state-changing request that rides on the session cookie,
so a route does not repeat it; a form only has to carry `csrf_field(request)` (or htmx the header, which
static/accounts.js adds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from fastapi import HTTPException, Request

Role = Literal["viewer", "editor", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "editor", "admin")  # each role may do what the ones before it may


def rank(role: str) -> int:
    return ROLES.index(role) if role in ROLES else -1  # type: ignore[arg-type,unused-ignore]


def valid_role(role: str) -> Role:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role  # type: ignore[return-value,unused-ignore]


@dataclass(frozen=True)
class Principal:
    """A signed-in user, as one request sees them (read from the store on every request: a disabled user,
    a revoked key or a changed role takes effect at once)."""

    user_id: int
    username: str
    role: Role
    via: Literal["session", "key"]
    key_id: int | None = None

    def can(self, role: str) -> bool:
        return rank(self.role) >= rank(role)

    @property
    def subject(self) -> str:
        """Whose quota a model request counts against: the key's own, else the user's."""
        return f"key:{self.key_id}" if self.key_id is not None else f"user:{self.user_id}"


def current_user(request: Request) -> Principal | None:
    return request.scope.get("state", {}).get("principal")


def accounts_on(request: Request) -> bool:
    accounts = getattr(request.app.state, "accounts", None)
    return bool(accounts and accounts.config.auth)


def require_role(role: Role) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the principal, if they hold `role` or more; else 401 (not signed in) or 403."""
    valid_role(role)

    def dependency(request: Request) -> Principal:
        if not accounts_on(request):
            raise HTTPException(403, "accounts are off on this server (start it with `saescope serve --auth`)")
        user = current_user(request)
        if user is None:
            raise HTTPException(401, "sign in or send an API key (Authorization: Bearer ...)", headers={"WWW-Authenticate": "Bearer"})
        if not user.can(role):
            raise HTTPException(403, f"this needs the {role} role; {user.username} is a {user.role}")
        return user

    dependency.__name__ = f"require_{role}"
    return dependency


require_user = require_role("viewer")
