"""Reading and writing the account tables: users, keys, sign-in attempts, the fair-use counters and usage.

Plain functions over a SQLAlchemy Connection, shared by the web app and the `saescope user` / `saescope key`
commands. `transaction(engine)` opens a write transaction; on PostgreSQL it runs at READ COMMITTED, so the
counters' upserts from many workers queue on the row instead of failing as concurrent updates would under
the store's REPEATABLE READ readers.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from sae_core.errors import SaescopeError

from . import api_keys, passwords
from .models import ApiKey, RateWindow, UsageDaily, User
from .roles import ROLES, Principal, valid_role


class AccountError(SaescopeError):
    """A request about accounts that cannot be done (unknown user, taken name, bad role...)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC)."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            yield conn


# ---------------------------------------------------------------------- users


@dataclass(frozen=True)
class UserRow:
    id: int
    username: str
    role: str
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None
    locked_until: datetime | None
    keys: int = 0


def _user_by_name(conn: Connection, username: str) -> Row:
    row = conn.execute(select(User.__table__).where(User.username == username)).first()
    if row is None:
        raise AccountError(f"no user named {username!r}")
    return row


def add_user(conn: Connection, username: str, password: str | None, role: str = "viewer", oidc: tuple[str, str] | None = None) -> int:
    """A new user; `oidc` (issuer, subject) links them to their account at the OIDC provider."""
    username = username.strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):
        raise AccountError("a username is 1 to 64 characters without spaces")
    valid_role(role)
    if conn.execute(select(User.id).where(User.username == username)).first() is not None:
        raise AccountError(f"there is already a user named {username!r}")
    try:
        hashed = passwords.hash_password(password) if password is not None else None
    except ValueError as exc:
        raise AccountError(str(exc)) from exc
    return conn.execute(
        insert(User)
        .values(
            username=username,
            role=role,
            password_hash=hashed,
            created_at=utcnow(),
            oidc_issuer=oidc[0].rstrip("/") if oidc else None,
            oidc_subject=oidc[1] if oidc else None,
        )
        .returning(User.id)
    ).scalar_one()


def list_users(conn: Connection) -> list[UserRow]:
    keys = select(ApiKey.user_id, func.count().label("n")).where(ApiKey.revoked_at.is_(None)).group_by(ApiKey.user_id).subquery()
    rows = conn.execute(
        select(User.id, User.username, User.role, User.disabled, User.created_at, User.last_login_at, User.locked_until, keys.c.n)
        .outerjoin(keys, keys.c.user_id == User.id)
        .order_by(User.username)
    )
    return [UserRow(r[0], r[1], r[2], bool(r[3]), aware(r[4]), aware(r[5]), aware(r[6]), r[7] or 0) for r in rows]  # type: ignore[arg-type]


def set_role(conn: Connection, username: str, role: str) -> None:
    valid_role(role)
    row = _user_by_name(conn, username)
    # a new role ends the user's sessions, so no page stays open with powers it no longer has
    conn.execute(update(User).where(User.id == row.id).values(role=role, session_epoch=User.session_epoch + 1))


def set_disabled(conn: Connection, username: str, disabled: bool) -> None:
    row = _user_by_name(conn, username)
    conn.execute(update(User).where(User.id == row.id).values(disabled=disabled, session_epoch=User.session_epoch + 1))


def set_password(conn: Connection, username: str, password: str) -> None:
    row = _user_by_name(conn, username)
    try:
        hashed = passwords.hash_password(password)
    except ValueError as exc:
        raise AccountError(str(exc)) from exc
    conn.execute(
        update(User)
        .where(User.id == row.id)
        .values(password_hash=hashed, failed_logins=0, locked_until=None, session_epoch=User.session_epoch + 1)
    )


def end_sessions(conn: Connection, user_id: int) -> None:
    conn.execute(update(User).where(User.id == user_id).values(session_epoch=User.session_epoch + 1))


def user_for_session(conn: Connection, user_id: int, epoch: int) -> Principal | None:
    row = conn.execute(select(User.username, User.role, User.disabled, User.session_epoch).where(User.id == user_id)).first()
    if row is None or row.disabled or row.session_epoch != epoch or row.role not in ROLES:
        return None
    return Principal(user_id, row.username, row.role, "session")


# ---------------------------------------------------------------------- signing in


@dataclass(frozen=True)
class LoginCandidate:
    user_id: int | None
    password_hash: str | None
    locked_for: float  # seconds the account stays locked (0: not locked)
    epoch: int = 0


def login_candidate(conn: Connection, username: str) -> LoginCandidate:
    row = conn.execute(
        select(User.id, User.password_hash, User.disabled, User.locked_until, User.session_epoch).where(User.username == username)
    ).first()
    if row is None or row.disabled:
        return LoginCandidate(None, None, 0.0)
    until = aware(row.locked_until)
    locked = (until - utcnow()).total_seconds() if until is not None else 0.0
    return LoginCandidate(row.id, row.password_hash, max(0.0, locked), row.session_epoch)


def record_failure(conn: Connection, user_id: int, max_failures: int, lockout_minutes: float) -> bool:
    """Count a failed password; True when this one locked the account."""
    failures = conn.execute(
        update(User).where(User.id == user_id).values(failed_logins=User.failed_logins + 1).returning(User.failed_logins)
    ).scalar_one()
    if failures >= max_failures:
        until = utcnow() + timedelta(minutes=lockout_minutes)
        conn.execute(update(User).where(User.id == user_id).values(failed_logins=0, locked_until=until))
        return True
    return False


def record_success(conn: Connection, user_id: int, password: str, stored: str) -> None:
    values: dict = {"failed_logins": 0, "locked_until": None, "last_login_at": utcnow()}
    if passwords.needs_rehash(stored):
        values["password_hash"] = passwords.HASHER.hash(password)
    conn.execute(update(User).where(User.id == user_id).values(**values))


def oidc_user(conn: Connection, issuer: str, subject: str, name: str, new_role: str) -> tuple[int, int] | None:
    """(user id, session epoch) of the user the OIDC provider vouched for; someone new gets an account with
    `new_role` under `name` (or the first free `name-2`, `name-3`...; never an existing local user's), or
    None with new_role "none". None too for a disabled user."""
    issuer = issuer.rstrip("/")
    row = conn.execute(
        select(User.id, User.disabled, User.session_epoch).where(User.oidc_issuer == issuer, User.oidc_subject == subject)
    ).first()
    if row is not None:
        if row.disabled:
            return None
        conn.execute(update(User).where(User.id == row.id).values(last_login_at=utcnow()))
        return row.id, row.session_epoch
    if new_role == "none":
        return None
    base = "".join(c for c in name.strip() if not c.isspace())[:56] or "user"
    taken = set(conn.execute(select(User.username).where(User.username.like(f"{base}%"))).scalars())
    username = next(n for n in [base, *(f"{base}-{i}" for i in range(2, 10_000))] if n not in taken)
    user_id = add_user(conn, username, None, new_role, oidc=(issuer, subject))
    conn.execute(update(User).where(User.id == user_id).values(last_login_at=utcnow()))
    return user_id, 0


# ---------------------------------------------------------------------- API keys


@dataclass(frozen=True)
class KeyRow:
    id: int
    username: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


KEY_COLUMNS = (ApiKey.id, User.username, ApiKey.name, ApiKey.prefix, ApiKey.created_at, ApiKey.last_used_at, ApiKey.revoked_at)


def _key_row(r: Row) -> KeyRow:
    return KeyRow(r[0], r[1], r[2], r[3], aware(r[4]), aware(r[5]), aware(r[6]))  # type: ignore[arg-type]


def add_key(conn: Connection, user_id: int, name: str) -> tuple[str, KeyRow]:
    """A new key for the user: (the key itself, shown once and never stored; its row)."""
    name = name.strip()[:100] or "key"
    key, digest, prefix = api_keys.new_key()
    key_id = conn.execute(
        insert(ApiKey).values(user_id=user_id, name=name, prefix=prefix, key_hash=digest, created_at=utcnow()).returning(ApiKey.id)
    ).scalar_one()
    return key, key_by_id(conn, key_id)


def add_key_for(conn: Connection, username: str, name: str) -> tuple[str, KeyRow]:
    return add_key(conn, _user_by_name(conn, username).id, name)


def key_by_id(conn: Connection, key_id: int) -> KeyRow:
    row = conn.execute(select(*KEY_COLUMNS).join(User, User.id == ApiKey.user_id).where(ApiKey.id == key_id)).first()
    if row is None:
        raise AccountError(f"no API key {key_id}")
    return _key_row(row)


def list_keys(conn: Connection, user_id: int | None = None) -> list[KeyRow]:
    q = select(*KEY_COLUMNS).join(User, User.id == ApiKey.user_id).order_by(ApiKey.id)
    if user_id is not None:
        q = q.where(ApiKey.user_id == user_id)
    return [_key_row(r) for r in conn.execute(q)]


def revoke_key(conn: Connection, key_id: int, user_id: int | None = None) -> bool:
    """Revoke key `key_id` (only if it is `user_id`'s, when given); False when there is no such key of theirs."""
    q = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if user_id is not None:
        q = q.where(ApiKey.user_id == user_id)
    return conn.execute(q.values(revoked_at=utcnow())).rowcount > 0  # type: ignore[attr-defined,unused-ignore]


def user_for_key(conn: Connection, key: str) -> tuple[Principal, datetime | None] | None:
    """The key's owner, if the key exists, is not revoked and its owner is not disabled. Read from the store
    on every request, never cached: a revoked key is refused from the next request on."""
    if not api_keys.looks_like_key(key):
        return None
    row = conn.execute(
        select(ApiKey.id, ApiKey.last_used_at, User.id, User.username, User.role)
        .join(User, User.id == ApiKey.user_id)
        .where(ApiKey.key_hash == api_keys.digest(key), ApiKey.revoked_at.is_(None), User.disabled.is_(False))
    ).first()
    if row is None or row[4] not in ROLES:
        return None
    return Principal(row[2], row[3], row[4], "key", key_id=row[0]), aware(row[1])


def touch_key(conn: Connection, key_id: int) -> None:
    conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))


# ---------------------------------------------------------------------- fair use


def _insert(conn: Connection) -> Callable[[type[RateWindow] | type[UsageDaily]], postgresql.Insert | sqlite.Insert]:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def hit(conn: Connection, subject: str, bucket: str, limit: int, window_s: int = 60, now: float | None = None) -> float | None:
    """Count one request of `subject` in `bucket`'s current fixed window and in its daily usage; the seconds
    until the window ends if this request is past `limit` (0: no limit), else None."""
    now = time.time() if now is None else now
    start = int(now // window_s * window_s)
    ins = _insert(conn)(RateWindow).values(subject=subject, bucket=bucket, window_start=start, count=1)
    count = conn.execute(
        ins.on_conflict_do_update(index_elements=["subject", "bucket", "window_start"], set_={"count": RateWindow.count + 1}).returning(
            RateWindow.count
        )
    ).scalar_one()
    refused = bool(limit) and count > limit
    day = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")
    use = _insert(conn)(UsageDaily).values(subject=subject, bucket=bucket, day=day, requests=int(not refused), refused=int(refused))
    conn.execute(
        use.on_conflict_do_update(
            index_elements=["subject", "bucket", "day"],
            set_={"requests": UsageDaily.requests + use.excluded.requests, "refused": UsageDaily.refused + use.excluded.refused},
        )
    )
    if count == 1:  # a new window: the windows before the last one are no longer needed
        conn.execute(delete(RateWindow).where(RateWindow.bucket == bucket, RateWindow.window_start < start - window_s))
    return max(1.0, start + window_s - now) if refused else None


@dataclass(frozen=True)
class UsageRow:
    subject: str
    who: str  # the key's name and owner, the user, or the address
    bucket: str
    requests: int
    refused: int
    last_day: str


def usage(conn: Connection, days: int = 7, now: float | None = None) -> list[UsageRow]:
    """Requests per client over the last `days` days (UTC), most first."""
    now = time.time() if now is None else now
    since = datetime.fromtimestamp(now - (days - 1) * 86400, timezone.utc).strftime("%Y-%m-%d")
    rows = conn.execute(
        select(UsageDaily.subject, UsageDaily.bucket, func.sum(UsageDaily.requests), func.sum(UsageDaily.refused), func.max(UsageDaily.day))
        .where(UsageDaily.day >= since)
        .group_by(UsageDaily.subject, UsageDaily.bucket)
    ).all()
    keys = {f"key:{k.id}": f"key {k.prefix}… “{k.name}” of {k.username}" for k in list_keys(conn)}
    users = {f"user:{u.id}": f"{u.username} (signed in)" for u in list_users(conn)}
    out = [
        UsageRow(s, keys.get(s) or users.get(s) or (s.removeprefix("addr:") + " (not signed in)"), b, int(n or 0), int(r or 0), d)
        for s, b, n, r, d in rows
    ]
    return sorted(out, key=lambda u: (-u.requests, u.subject))
