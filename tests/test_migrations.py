"""The Alembic chain goes up to head, back down to nothing, and up again, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from sae_core.store import db

TABLES = {"models", "vocab", "saes", "mining_runs", "features", "examples", "token_features", "run_weights", "explanations"}


def _round_trip(url: str) -> None:
    engine = db.make_engine(url)
    assert db.upgrade(engine) == db.head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())
    cfg = db._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert db.current_revision(engine) is None
    assert not TABLES & set(inspect(engine).get_table_names())
    db.upgrade(engine)
    db.check_schema(engine)   # no error at head
    engine.dispose()


def test_chain_round_trip_sqlite(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'm.db'}")


def test_chain_round_trip_postgres(pg_url):
    _round_trip(pg_url)
