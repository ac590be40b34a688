"""The annotation and feature-list endpoints keep their published contract with accounts on: schemathesis
with all its checks against a live server, once without a key (reads answer, writes a documented 401) and
twice with an editor's key (the second with the SAE name pinned, so annotations are written to real
features), on SQLite and on PostgreSQL. With accounts off the read endpoints are in test_api_contract.py's run."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import LiveServer, mine_tiny
from test_accounts_contract import AUTH
from test_api_contract import schemathesis

from app.accounts import store
from app.config import AppConfig
from app.main import create_app
from sae_core.store import db

TAGS = ("--include-tag", "annotations")


def run(url: str, tmp_path) -> None:
    with store.transaction(db.make_engine(url)) as conn:
        store.add_user(conn, "ed", "correct horse battery", "editor")
        key, _ = store.add_key_for(conn, "ed", "schemathesis")
    server = LiveServer(create_app(config=AppConfig.resolve(url, auth=AUTH)))
    try:
        schemathesis(server.url, tmp_path, "--checks", "all", *TAGS)
        schemathesis(server.url, tmp_path, "--checks", "all", "-H", f"Authorization: Bearer {key}", *TAGS)
        schemathesis(
            server.url,
            tmp_path,
            "--checks",
            "all",
            "--exclude-checks",
            "negative_data_rejection",
            "-H",
            f"Authorization: Bearer {key}",
            *TAGS,
            config='[parameters]\n"path.sae" = "tiny-sae"\n',
        )
    finally:
        server.stop()


def test_annotations_contract_on_sqlite(mined_store, tmp_path):
    copy = tmp_path / "store.db"
    with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    run(f"sqlite:///{copy}", tmp_path)


@pytest.mark.parametrize("backend", ["postgres"])
def test_annotations_contract_on_postgres(backend, tiny_sae_dir, tiny_lm, pg_url, tmp_path):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url)
    run(pg_url, tmp_path)
