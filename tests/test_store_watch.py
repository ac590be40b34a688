"""The server keeps the live runs ETags are made of and reads them again only when the store changed
(app/store_watch.py): not per request, yet every page follows a change at once."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.main import create_app
from conftest import mine_tiny
from sae_core.store import db
from sae_core.store.changes import mark_changed
from sae_core.store.schema import SAE

PAGES = ("/saes/tiny-sae/features/3", "/api/v1/saes/tiny-sae", "/", "/api/v1/saes")


def _touch(url: str) -> None:
    """A write from another process's point of view (what `saescope explain` does to a page)."""
    engine = db.make_engine(url)
    with Session(engine) as s, s.begin():
        mark_changed(s, s.scalar(select(SAE.id).where(SAE.name == "tiny-sae")))
    engine.dispose()


def _tags(client) -> dict[str, str]:
    return {p: client.get(p).headers["etag"] for p in PAGES}


def _check(url: str, settle_s: float) -> None:
    with TestClient(create_app(url)) as c:
        watch = c.app.state.store_watch
        before = _tags(c)
        reads = watch.reads
        for _ in range(10):
            assert _tags(c) == before
        # PostgreSQL: other tests' stores in the same database notify too; without the watch it would be 40
        assert watch.reads - reads <= 2
        _touch(url)
        deadline = time.monotonic() + settle_s
        while True:
            after = _tags(c)
            if all(after[p] != before[p] for p in PAGES) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        for p in PAGES:
            assert after[p] != before[p], p
            r = c.get(p, headers={"If-None-Match": before[p]})
            assert r.status_code == 200 and r.headers["etag"] == after[p], p


def test_sqlite_reads_runs_only_after_a_commit(tiny_sae_dir, tiny_lm, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine_tiny(tiny_sae_dir, tiny_lm, url, windows=32)
    _check(url, settle_s=0)  # exact: the very next request sees the commit


def test_postgres_follows_change_notifications(tiny_sae_dir, tiny_lm, pg_url):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url, windows=32)
    _check(pg_url, settle_s=2)  # the notification arrives about a millisecond after the commit


def test_reads_in_worker_threads_read_runs_every_time(tiny_sae_dir, tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCOPE_DB_THREADS", "2")  # no single connection to ask data_version of
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine_tiny(tiny_sae_dir, tiny_lm, url, windows=32)
    with TestClient(create_app(url)) as c:
        before = _tags(c)
        _touch(url)
        assert all(tag != before[p] for p, tag in _tags(c).items())
        assert c.app.state.store_watch.reads == 2 * len(PAGES)
