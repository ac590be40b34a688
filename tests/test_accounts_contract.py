"""The account endpoints and the model's endpoints keep their published contract with accounts on:
schemathesis with all its checks, once with a personal API key and once without (every answer then a
documented 401), on SQLite and on PostgreSQL, against a live server with its model process. The read
API's contract with accounts off is test_api_contract.py's."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import LiveServer, mine_tiny
from test_api_contract import LIVE, PIN_STEER_SAE, schemathesis, wait_ready

from app.accounts import store
from app.config import AppConfig
from app.main import create_app
from sae_core.config import AuthConfig
from sae_core.store import db

# Limits far above what a run sends: a 429 here would be a test artefact (test_accounts.py tests them)
AUTH = AuthConfig(auth=True, live_per_minute=100_000, login_per_minute=100_000)
TAGS = ("--include-tag", "accounts", "--include-tag", "live")


def new_key(url: str) -> str:
    """A fresh key for each schemathesis run: a run may revoke its own key (DELETE /api/v1/keys/{id}), and
    from then on every request with it is a documented 401."""
    with store.transaction(db.make_engine(url)) as conn:
        key, _ = store.add_key_for(conn, "ada", "schemathesis")
    return key


def run(url: str, tmp_path) -> None:
    with store.transaction(db.make_engine(url)) as conn:
        store.add_user(conn, "ada", "correct horse battery", "admin")
        for i in range(8):  # so that a generated DELETE /keys/{id} (small ids first) rarely hits the run's own key
            store.add_key_for(conn, "ada", f"other {i}")
    server = LiveServer(create_app(config=AppConfig.resolve(url, live=LIVE, auth=AUTH)))
    try:
        wait_ready(server.url)
        schemathesis(server.url, tmp_path, "--checks", "all", *TAGS)  # without a key: 401 everywhere, as documented
        schemathesis(server.url, tmp_path, "--checks", "all", "-H", f"Authorization: Bearer {new_key(url)}", *TAGS)
        schemathesis(
            server.url,
            tmp_path,
            "--checks",
            "all",
            "--exclude-checks",
            "negative_data_rejection",
            "-H",
            f"Authorization: Bearer {new_key(url)}",
            *TAGS,
            config='[parameters]\n"path.sae" = "tiny-sae"\n',
            hooks=PIN_STEER_SAE,
        )
    finally:
        server.stop()


def test_accounts_contract_on_sqlite(mined_store, tmp_path):
    copy = tmp_path / "store.db"
    with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    run(f"sqlite:///{copy}", tmp_path)


@pytest.mark.parametrize("backend", ["postgres"])
def test_accounts_contract_on_postgres(backend, tiny_sae_dir, tiny_lm, pg_url, tmp_path):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url)
    run(pg_url, tmp_path)
