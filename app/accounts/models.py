"""The account tables: users, their API keys, and the counters of the fair-use limits.

They live on the store's declarative Base (sae_core.store.schema.Base), so the Alembic chain in
migrations/ (0008) creates them on both backends, and later tables (annotations, feature lists) can
refer to users and to the store's SAEs alike; the code that reads and writes them is the app's.

    users ─< api_keys        a personal key is stored as its SHA-256 only (see api_keys.py for why)
    rate_windows             one row per (client, bucket, window): requests counted in fixed windows
    usage_daily              per client and day: requests answered and refused, the admin's usage report
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from sae_core.store.schema import Base, utcnow


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="viewer")  # viewer < editor < admin (roles.py)
    password_hash: Mapped[str | None] = mapped_column(String(255))  # argon2id (passwords.py); None: cannot sign in with a password
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # consecutive, reset on success
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Every session cookie carries the epoch it was issued in: bumping it (password change, disable, role
    # change, "sign out everywhere") ends all of the user's sessions at once, signed cookies or not.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A user who signs in through OpenID Connect (oidc.py): the provider and its stable id for them
    oidc_issuer: Mapped[str | None] = mapped_column(String(512))
    oidc_subject: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (UniqueConstraint("oidc_issuer", "oidc_subject", name="uq_users_oidc"),)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, to tell keys apart in lists
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the whole key
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RateWindow(Base):
    __tablename__ = "rate_windows"
    subject: Mapped[str] = mapped_column(String(100), primary_key=True)  # key:ID, user:ID or addr:IP
    bucket: Mapped[str] = mapped_column(String(16), primary_key=True)  # live (the model) or login
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds
    count: Mapped[int] = mapped_column(Integer, default=0)


class UsageDaily(Base):
    __tablename__ = "usage_daily"
    subject: Mapped[str] = mapped_column(String(100), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(16), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD (UTC)
    requests: Mapped[int] = mapped_column(Integer, default=0)  # answered (let through to the model)
    refused: Mapped[int] = mapped_column(Integer, default=0)  # answered 429
