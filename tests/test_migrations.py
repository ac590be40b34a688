"""The Alembic chain goes up to head, back down to nothing, and up again, on SQLite and PostgreSQL; a
data migration keeps a mined run's rows."""

from __future__ import annotations

import json
import sqlite3

from alembic import command
from conftest import mine_tiny
from sqlalchemy import inspect, text

from sae_core.store import db

TABLES = {"models", "vocab", "saes", "mining_runs", "features", "examples", "token_features", "run_weights", "explanations",
          "sweeps"}


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


def _feature_rows(engine) -> dict:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT feature_index, neighbours, top_token_id FROM features ORDER BY feature_index")).all()
    return {i: (json.loads(n) if isinstance(n, str) else n, t) for i, n, t in rows}


def _downgrade_then_upgrade_keeps_mined_rows(url: str) -> None:
    """0004 fills top_token_id and each neighbour's top token in from a run's examples: taking the store
    down to 0003 (which strips them) and up again gives back exactly what the writer stored."""
    engine = db.make_engine(url)
    written = _feature_rows(engine)
    assert any(t is not None for _, t in written.values()) and all(len(n) == 3 for near, _ in written.values() for n in near)
    cfg = db._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        near = conn.execute(text("SELECT neighbours FROM features LIMIT 1")).scalar()
    assert all(len(n) == 2 for n in (json.loads(near) if isinstance(near, str) else near))
    assert "top_token_id" not in {c["name"] for c in inspect(engine).get_columns("features")}
    db.upgrade(engine)
    assert _feature_rows(engine) == written
    engine.dispose()


def test_top_tokens_migration_sqlite(mined_store, tmp_path):
    copy = tmp_path / "store.db"
    with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)  # the store is in WAL mode: a file copy could miss what the log still holds
    _downgrade_then_upgrade_keeps_mined_rows(f"sqlite:///{copy}")


def test_top_tokens_migration_postgres(tiny_sae_dir, tiny_lm, pg_url):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url)
    _downgrade_then_upgrade_keeps_mined_rows(pg_url)
