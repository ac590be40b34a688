"""The SAE page's table from the run's checkpoints (store/order.py) is exactly the sorted, filtered
table, on every page, the last included, and the same as the OFFSET path of older stores."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from app.main import create_app
from conftest import mine_tiny
from sae_core.store import db, order
from sae_core.store.schema import Feature, FeatureOrder

COMBOS = [(s, f, o) for s in order.SORTS for f in order.FILTERS for o in ("asc", "desc")]


def _reference(url: str) -> dict:
    engine = db.make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(Feature.index, Feature.density, Feature.max_act)).all()
    engine.dispose()
    out = {}
    for sort, flt, direction in COMBOS:
        kept = [r for r in rows if {"all": True, "alive": r[1] > 0, "dead": r[1] == 0, "rare": 0 < r[1] < order.RARE_DENSITY}[flt]]
        key = {"index": lambda r: (r[0], r[0]), "density": lambda r: (r[1], r[0]), "max_act": lambda r: (r[2], r[0])}[sort]
        out[sort, flt, direction] = [r[0] for r in sorted(kept, key=key, reverse=direction == "desc")]
    return out


def _pages(client, sort, flt, direction, total, limit=7):
    got = []
    for offset in [*range(0, total + limit, limit), total - 1, total + 3]:
        r = client.get("/api/v1/saes/tiny-sae/features", params=dict(offset=offset, limit=limit, sort=sort, order=direction, filter=flt))
        assert r.status_code == 200
        page = r.json()
        assert page["total"] == total
        if offset % limit == 0 and offset < total + limit:
            got += [f["index"] for f in page["features"]]
        else:  # an offset between checkpoints, or past the end
            assert len(page["features"]) == max(0, min(limit, total - offset))
    return got


@pytest.fixture(scope="module")
def store(tiny_sae_dir, tiny_lm, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(order, "EVERY", 8)  # 128 features: many checkpoints per list
    mp.setattr(order, "RARE_DENSITY", 0.01)  # 768 positions mined: no density below 1e-4
    url = f"sqlite:///{tmp_path_factory.mktemp('order') / 'store.db'}"
    mine_tiny(tiny_sae_dir, tiny_lm, url, windows=24)
    yield url, mp
    mp.undo()


def test_every_page_matches_the_sorted_table(store):
    url, _ = store
    want = _reference(url)
    assert any(want["index", "dead", "asc"]) and any(want["index", "rare", "asc"])  # the filters have rows to page through
    with TestClient(create_app(url)) as c:
        for combo in COMBOS:
            assert _pages(c, *combo, total=len(want[combo])) == want[combo], combo


def test_stores_without_checkpoints_page_by_offset_to_the_same_result(store, tmp_path):
    url, _ = store
    copy = tmp_path / "copy.db"
    import sqlite3

    src, dst = sqlite3.connect(url.removeprefix("sqlite:///")), sqlite3.connect(copy)
    src.backup(dst)
    src.close(), dst.close()
    copy_url = f"sqlite:///{copy}"
    engine = db.make_engine(copy_url)
    with engine.begin() as conn:
        conn.execute(delete(FeatureOrder))
    engine.dispose()
    want = _reference(copy_url)
    with TestClient(create_app(copy_url)) as c:
        for combo in COMBOS:
            assert _pages(c, *combo, total=len(want[combo])) == want[combo], combo
