"""Accounts (issue 31): users with roles, signed session cookies, CSRF, personal API keys, and fair-use
limits on the model. Off by default; `saescope serve --auth` turns them on.

For routes that write (annotations, feature lists):

    from app.accounts import Principal, current_user, require_role

    @router.post("/...")
    async def write(request: Request, user: Principal = Depends(require_role("editor"))): ...

- `current_user(request)`: the signed-in Principal (user_id, username, role, via, key_id) or None.
- `require_role("viewer" | "editor" | "admin")`: a dependency answering 401 / 403 otherwise, and 403
  while accounts are off (nobody writes to an anonymous atlas).
- CSRF is checked by the middleware before any route runs; htmx requests get the header from
  static/accounts.js, which also adds the hidden field to every POST form of a page (cached pages too).
  On uncached pages a template may also write `{{ csrf_field(request) }}` inside the form.
- A router for account-only pages is mounted by `install` (routes.pages, routes.api); a later feature
  mounts its own routers in create_app and guards them with `require_role`.
"""

from .roles import ROLES, Principal, Role, current_user, require_role, require_user
from .setup import add_middleware, install

__all__ = ["ROLES", "add_middleware", "Principal", "Role", "current_user", "install", "require_role", "require_user"]
