"""Connect to the store and keep its schema current.

The URL comes from `--db`, else `SAESCOPE_DATABASE_URL`, else a SQLite file in the data directory
(`$SAESCOPE_HOME/saescope.db`, WAL mode so the browser reads while `mine` writes). PostgreSQL URLs
such as `postgresql://user@host:5432/db` are driven by psycopg 3. Every transaction reads one
snapshot (SQLite: explicit BEGIN; PostgreSQL: REPEATABLE READ), so a reader that runs a page's
queries in one transaction sees either the old mining run or the new one, whole. The schema is owned by the
Alembic chain in `migrations/`: `saescope db upgrade` applies it, and readers refuse a database
that is behind with a message naming that command.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError, OperationalError

from .. import settings
from ..errors import SaescopeError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.pool import ConnectionPoolEntry

ENV_URL = "SAESCOPE_DATABASE_URL"
APPLICATION_NAME = "saescope"  # PostgreSQL: how our connections show in pg_stat_activity


class SchemaOutOfDate(SaescopeError):
    """The database is not at the schema this code expects."""


def database_url(url: str | None = None) -> str:
    """The store's URL: the argument, else $SAESCOPE_DATABASE_URL, else the SQLite file in the data directory."""
    url = url or os.environ.get(ENV_URL)
    if not url:
        settings.home().mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{settings.home() / 'saescope.db'}"
    if url.startswith(("postgres://", "postgresql://")):  # pick psycopg 3 unless the URL names a driver
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str | None = None) -> Engine:
    """An engine for the store; raises a clear SaescopeError when the URL is malformed or unreachable."""
    url = database_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise SaescopeError(f"cannot parse database URL {url!r}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # The driver's own transaction handling skips BEGIN before SELECTs, so a reader's queries would
        # each see a different state; SQLAlchemy's documented recipe: autocommit driver, explicit BEGIN.
        engine = create_engine(url, connect_args={"timeout": 60, "isolation_level": None})

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.connection.driver_connection.execute("BEGIN")  # type: ignore[union-attr]  # on the driver: exec_driver_sql cost 10x the query

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block on the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses no committed run
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    elif parsed.get_backend_name() == "postgresql":
        # REPEATABLE READ: each transaction reads one snapshot, so a page never mixes two mining runs.
        engine = create_engine(
            url,
            pool_size=10,
            max_overflow=40,
            pool_pre_ping=True,
            isolation_level="REPEATABLE READ",
            connect_args={"connect_timeout": 10, "application_name": APPLICATION_NAME},
            json_deserializer=orjson.loads,  # psycopg's own loader is the stdlib's: 4 JSON columns per feature page
        )
    else:
        raise SaescopeError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:///path or postgresql://...")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise SaescopeError(f"cannot reach the database at {redact(url)}: {reason}") from exc
    return engine


def _alembic_config() -> Config:
    from alembic.config import Config

    # The chain is the top-level `migrations` package (so it ships with editable and regular installs).
    # It is located, not imported: migrations/env.py imports the store, and the dependency stays one-way.
    spec = importlib.util.find_spec("migrations")
    if spec is None or spec.origin is None:
        raise SaescopeError("the migrations package is missing from this install of saescope; reinstall it")
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(spec.origin).parent))
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the migrations/ chain has a head revision"
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply the Alembic migrations up to `revision`; returns the revision the database is now at."""
    from alembic import command

    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    now = current_revision(engine)
    assert now is not None, "an upgraded database has a revision"
    return now


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate unless the database is at the head revision."""
    have, want = current_revision(engine), head_revision()
    if have != want:
        state = "has no saescope schema" if have is None else f"is at schema revision {have}, this saescope needs {want}"
        where = "" if os.environ.get(ENV_URL) or engine.url.get_backend_name() == "sqlite" else f" --db {redact(str(engine.url))}"
        raise SchemaOutOfDate(f"the database {redact(str(engine.url))} {state}: run `saescope db upgrade{where}`")


def open_store(url: str | None = None, upgrade_schema: bool = False) -> Engine:
    """Engine for an up-to-date store; with upgrade_schema the migrations are applied first."""
    engine = make_engine(url)
    if upgrade_schema:
        upgrade(engine)
    else:
        check_schema(engine)
    return engine
