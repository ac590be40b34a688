"""`saescope user ...`, `saescope key ...` and `saescope usage`: the accounts of a server run with --auth
(app/accounts), kept in the store. Registered on the CLI by saescope/cli.py."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from app.accounts.store import KeyRow

T = TypeVar("T")
DB = typer.Option(None, "--db", help="Database URL (default: $SAESCOPE_DATABASE_URL, else SQLite in the data directory).")


def _engine(db: str | None) -> Engine:
    from sae_core.store import db as store_db

    return store_db.open_store(db)


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "never"


def register(app: typer.Typer, console: Console) -> None:
    users = typer.Typer(no_args_is_help=True, help="Accounts of a server run with --auth (roles: viewer, editor, admin).")
    keys = typer.Typer(no_args_is_help=True, help="Personal API keys (Authorization: Bearer ...), stored as SHA-256 digests.")
    app.add_typer(users, name="user")
    app.add_typer(keys, name="key")

    def _write(db: str | None, work: Callable[..., T], *args: Any) -> T:
        from app.accounts import store

        with store.transaction(_engine(db)) as conn:
            return work(conn, *args)

    def _password(password: str | None) -> str:
        return password if password is not None else typer.prompt("password", hide_input=True, confirmation_prompt=True)

    @users.command("add")
    def user_add(
        username: str = typer.Argument(..., help="The sign-in name (no spaces)."),
        role: str = typer.Option("viewer", "--role", help="viewer (reads, uses the model), editor (annotates), admin (manages users)."),
        password: str | None = typer.Option(None, "--password", help="Asked for when left out (safer than a command line)."),
        oidc_subject: str | None = typer.Option(
            None, "--oidc-subject", help="Link the user to this subject (`sub`) at the OIDC provider; then no password is asked for."
        ),
        oidc_issuer: str | None = typer.Option(None, "--oidc-issuer", help="The provider's issuer URL (what serve --oidc-issuer says)."),
        db: str | None = DB,
    ) -> None:
        """Add a user."""
        from app.accounts import store

        if (oidc_subject is None) != (oidc_issuer is None):
            raise store.AccountError("--oidc-subject and --oidc-issuer go together")
        oidc = (oidc_issuer, oidc_subject) if oidc_issuer and oidc_subject else None
        secret = password if oidc is not None else _password(password)
        _write(db, store.add_user, username, secret, role, oidc)
        console.print(f"user {escape(username)} added ({role})")

    @users.command("list")
    def user_list(db: str | None = DB) -> None:
        """Every user, their role, state and number of live keys."""
        from app.accounts import store

        for u in _write(db, store.list_users):
            state = "disabled" if u.disabled else "locked" if u.locked_until and u.locked_until > store.utcnow() else "active"
            console.print(f"{u.username:24} {u.role:7} {state:8} keys {u.keys:<3} last sign-in {_when(u.last_login_at)}", markup=False)

    @users.command("role")
    def user_role(username: str, role: str = typer.Argument(..., help="viewer, editor or admin"), db: str | None = DB) -> None:
        """Give a user another role (their sessions end)."""
        from app.accounts import store

        _write(db, store.set_role, username, role)
        console.print(f"{escape(username)} is now {role}")

    @users.command("disable")
    def user_disable(
        username: str, enable: bool = typer.Option(False, "--enable", help="Enable the user again instead."), db: str | None = DB
    ) -> None:
        """Disable a user: their sessions and API keys stop working at once."""
        from app.accounts import store

        _write(db, store.set_disabled, username, not enable)
        console.print(f"{escape(username)} {'enabled' if enable else 'disabled'}")

    @users.command("password")
    def user_password(username: str, password: str | None = typer.Option(None, "--password"), db: str | None = DB) -> None:
        """Set a user's password (unlocks the account and ends their sessions)."""
        from app.accounts import store

        _write(db, store.set_password, username, _password(password))
        console.print(f"password of {escape(username)} set")

    @keys.command("add")
    def key_add(username: str, name: str = typer.Option("key", "--name", help="What the key is for."), db: str | None = DB) -> None:
        """Make an API key for a user and print it (this once: only its digest is kept)."""
        from app.accounts import store

        key, row = _write(db, store.add_key_for, username, name)
        console.print(f"key {row.id} for {escape(username)} ({escape(row.name)}); it is not shown again:", highlight=False)
        console.print(key, markup=False, highlight=False, soft_wrap=True)

    @keys.command("list")
    def key_list(username: str | None = typer.Argument(None, help="Only this user's keys."), db: str | None = DB) -> None:
        """API keys: id, owner, name, first characters, last use, revoked or not."""
        from app.accounts import store

        def work(conn: Connection) -> list[KeyRow]:
            uid = None
            if username is not None:
                uid = next((u.id for u in store.list_users(conn) if u.username == username), None)
                if uid is None:
                    raise store.AccountError(f"no user named {username!r}")
            return store.list_keys(conn, uid)

        for k in _write(db, work):
            state = f"revoked {_when(k.revoked_at)}" if k.revoked_at else "valid"
            line = f"{k.id:5} {k.username:20} {k.prefix}…  {k.name:20} last used {_when(k.last_used_at):16} {state}"
            console.print(line, markup=False, highlight=False)

    @keys.command("revoke")
    def key_revoke(key_id: int = typer.Argument(..., help="The key's id (saescope key list)."), db: str | None = DB) -> None:
        """Revoke a key: refused from the next request on."""
        from app.accounts import store

        if not _write(db, store.revoke_key, key_id):
            raise store.AccountError(f"no API key {key_id} that is still valid")
        console.print(f"key {key_id} revoked")

    @app.command("usage")
    def usage(days: int = typer.Option(7, "--days", min=1, help="Days to add up, today included (UTC)."), db: str | None = DB) -> None:
        """Model requests per API key, user and address (and sign-in attempts), most first."""
        from app.accounts import store

        rows = _write(db, store.usage, days)
        if not rows:
            console.print(f"nothing counted in the last {days} days")
        for u in rows:
            console.print(
                f"{u.requests:8,} {u.refused:6,} refused  {u.bucket:5}  {u.who}  (last {u.last_day})", markup=False, highlight=False
            )
