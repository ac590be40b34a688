"""The feature map (`saescope map`, sae_core/relations/map.py; app/feature_map.py): every alive feature
placed, the same map for the same seed, the same on SQLite and PostgreSQL, resumable, the API's
pages, the packed points and labels the page draws, the feature page's inset, and clear errors."""

from __future__ import annotations

import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mine_tiny
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, update

from app.main import create_app
from sae_core.config import MapConfig
from sae_core.errors import SaescopeError
from sae_core.relations.map import build_map
from sae_core.store.schema import SAE, Feature, FeatureMap, FeatureMapPoint

SAESCOPE = str(Path(sys.executable).parent / "saescope")


def copy_store(url: str, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as src, sqlite3.connect(folder / "store.db") as dst:
        src.backup(dst)  # WAL mode: a file copy could miss what the log still holds
    return f"sqlite:///{folder / 'store.db'}"


def points(url: str) -> list[tuple]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                FeatureMapPoint.index, FeatureMapPoint.x, FeatureMapPoint.y, FeatureMapPoint.cluster, FeatureMapPoint.neighbours
            ).order_by(FeatureMapPoint.index)
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def alive(url: str) -> list[int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        out = list(conn.scalars(select(Feature.index).where(Feature.n_fired > 0).order_by(Feature.index)))
    engine.dispose()
    return out


@pytest.fixture(scope="module")
def mapped(mined_store, tmp_path_factory):
    """A copy of the mined tiny store with its map (clusters of at least 5 features, so the tiny map has some)."""
    url = copy_store(mined_store, tmp_path_factory.mktemp("mapped"))
    result = build_map("tiny-sae", MapConfig(db=url, min_cluster_size=5))
    return url, result


@pytest.fixture(scope="module")
def client(mapped):
    with TestClient(create_app(mapped[0])) as c:
        yield c


def test_every_alive_feature_is_on_the_map_once(mapped):
    url, result = mapped
    rows = points(url)
    assert [r[0] for r in rows] == alive(url) and result.n_points == len(rows) > 20
    xy = np.array([(r[1], r[2]) for r in rows])
    assert np.isfinite(xy).all() and xy.std(axis=0).min() > 0  # a spread-out layout, not one point
    clusters = {r[3] for r in rows}
    assert result.n_clusters >= 1 and clusters <= {-1, *range(result.n_clusters)}
    on_map = {r[0] for r in rows}
    for index, _, _, _, near in rows[:10]:
        assert len(near) == 8 and index not in {n[0] for n in near} and {n[0] for n in near} <= on_map
        assert [n[1] for n in near] == sorted(n[1] for n in near)  # nearest first


def test_a_seed_gives_the_same_map_and_a_rerun_is_a_no_op(mapped, tmp_path):
    url, first = mapped
    stored = points(url)
    again = build_map("tiny-sae", MapConfig(db=url, min_cluster_size=5))
    assert again.skipped and points(url) == stored
    with pytest.raises(SaescopeError, match="--force"):
        build_map("tiny-sae", MapConfig(db=url, min_cluster_size=5, seed=1))

    other = copy_store(url, tmp_path / "other")
    forced = build_map("tiny-sae", MapConfig(db=other, min_cluster_size=5, force=True))  # computed from nothing: no work folder
    assert not forced.skipped and points(other) == stored
    build_map("tiny-sae", MapConfig(db=other, min_cluster_size=5, seed=1, force=True))
    assert [r[1:3] for r in points(other)] != [r[1:3] for r in stored]  # the seed is used


def test_a_killed_run_resumes_without_laying_out_again(mined_store, mapped, tmp_path):
    """Killed after the layout (while clustering): nothing is stored, and the re-run reads the kept
    layout, runs no UMAP epoch, and stores the same map as an uninterrupted run."""
    url = copy_store(mined_store, tmp_path / "killed")
    cfg = MapConfig(db=url, min_cluster_size=5)

    def killed(stage: str, done: int, total: int) -> None:
        if stage == "clusters":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_map("tiny-sae", cfg, killed)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.scalar(select(FeatureMap.run_id)) is None  # nothing stored before the end
    engine.dispose()
    seen: list[tuple[str, int, int]] = []
    result = build_map("tiny-sae", MapConfig(db=url, min_cluster_size=5), lambda *p: seen.append(p))
    assert ("layout", 1, 1) in seen and not any(s == "layout" and t > 1 for s, _, t in seen)  # no epochs: read back
    assert not result.skipped and points(url) == points(mapped[0])


def test_sqlite_and_postgresql_give_the_same_map(mapped, tiny_sae_dir, tiny_lm, pg_url):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url)
    build_map("tiny-sae", MapConfig(db=pg_url, min_cluster_size=5))
    assert points(pg_url) == points(mapped[0])


def test_bad_input_says_what_to_do(mined_store, tmp_path):
    url = copy_store(mined_store, tmp_path / "bad")
    with pytest.raises(SaescopeError, match="no SAE named 'nope'; it has tiny-sae"):
        build_map("nope", MapConfig(db=url))
    with pytest.raises(SaescopeError, match="n_neighbors=200"):
        build_map("tiny-sae", MapConfig(db=url, n_neighbors=200))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(update(SAE).values(active_run_id=None))
    engine.dispose()
    with pytest.raises(SaescopeError, match="has not been mined yet"):
        build_map("tiny-sae", MapConfig(db=url))
    r = subprocess.run([SAESCOPE, "map", "--sae", "nope", "--db", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no SAE named 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_api_pages_through_every_point(client, mapped):
    url, result = mapped
    stored = points(url)
    seen, offset = [], 0
    while True:
        page = client.get("/api/v1/saes/tiny-sae/map", params={"offset": offset, "limit": 7}).json()
        assert page["n_points"] == result.n_points and page["seed"] == 0 and page["config"]["metric"] == "cosine"
        if not page["points"]:
            break
        assert len(page["points"]) <= 7
        seen += page["points"]
        offset += 7
    assert [(p["index"], p["x"], p["y"], p["cluster"]) for p in seen] == [r[:4] for r in stored]
    assert client.get("/api/v1/saes/tiny-sae/map", params={"limit": 0}).status_code == 422
    missing = client.get("/api/v1/saes/nope/map")
    assert missing.status_code == 404 and "no SAE named 'nope'" in missing.json()["detail"]


def test_no_map_yet_is_explained(mined_store):
    with TestClient(create_app(mined_store)) as c:
        r = c.get("/api/v1/saes/tiny-sae/map")
        assert r.status_code == 404 and "saescope map --sae tiny-sae" in r.json()["detail"]
        page = c.get("/saes/tiny-sae/map")
        assert page.status_code == 200 and "saescope map --sae tiny-sae" in page.text
        assert "saescope map --sae tiny-sae" in c.get("/saes/tiny-sae/features/0/map-inset").text
        assert c.get("/saes/nope/map").status_code == 404


def test_points_and_labels_are_what_the_page_draws(client, mapped):
    url, result = mapped
    stored = points(url)
    body = client.get("/saes/tiny-sae/map/points.bin").content
    magic, version, n, n_clusters = body[:4], *struct.unpack("<III", body[4:16])
    assert (magic, version, n, n_clusters) == (b"SMAP", 1, len(stored), result.n_clusters) and len(body) == 16 + 20 * n
    x, y, index, cluster, log_density = (
        np.frombuffer(body, dtype=dt, count=n, offset=16 + 4 * n * k) for k, dt in enumerate("<f4 <f4 <i4 <i4 <f4".split())
    )
    assert index.tolist() == [r[0] for r in stored] and cluster.tolist() == [r[3] for r in stored]
    assert np.allclose(x, [r[1] for r in stored]) and np.allclose(y, [r[2] for r in stored]) and (log_density <= 0).all()
    labels = client.get("/saes/tiny-sae/map/labels.json").json()
    assert len(labels["tokens"]) == len(labels["explanations"]) == n and any(t for t in labels["tokens"])
    # a search for a feature's strongest token lights that feature up
    token = next(t for t in labels["tokens"] if t and t.strip().isalpha())
    found = client.get("/saes/tiny-sae/map/search", params={"q": token.strip()}).json()
    expected = [int(i) for i, t in zip(index, labels["tokens"]) if t and token.strip().lower() in t.lower()]
    assert set(expected) <= set(found["indices"]) and found["token_matches"] >= len(expected) > 0


def test_feature_page_inset_marks_the_feature_and_lists_its_map_neighbours(client, mapped):
    url, _ = mapped
    index, x, y, cluster, near = points(url)[3]
    page = client.get(f"/saes/tiny-sae/features/{index}")
    assert f'hx-get="/saes/tiny-sae/features/{index}/map-inset"' in page.text
    inset = client.get(f"/saes/tiny-sae/features/{index}/map-inset").text
    assert '<svg class="map-inset"' in inset and 'class="here"' in inset and f'href="/saes/tiny-sae/map#f={index}"' in inset
    links = [
        line.split('href="/saes/tiny-sae/features/')[1].split('"')[0] for line in inset.splitlines() if 'class="map-neighbour"' in line
    ]
    assert [int(i) for i in links] == [n[0] for n in near]
    dead = sorted(set(range(128)) - set(alive(url)))
    if dead:
        assert "never fired" in client.get(f"/saes/tiny-sae/features/{dead[0]}/map-inset").text
    assert 'href="/saes/tiny-sae/map"' in client.get("/saes/tiny-sae").text


def test_a_teams_label_is_in_the_map_hover_data_and_the_feature_table(mapped, tmp_path):
    """Issue 31: an annotation's label shows in the map's hover (labels.json, drawn by map.js as text) and in
    the SAE page's feature table, escaped."""
    from app.annotations.models import Annotation

    url = copy_store(mapped[0], tmp_path / "labelled")
    engine = create_engine(url)
    with engine.begin() as conn:
        sae_id = conn.execute(select(SAE.id).where(SAE.name == "tiny-sae")).scalar_one()
        first = conn.execute(select(FeatureMapPoint.index).order_by(FeatureMapPoint.index)).scalars().first()
        conn.execute(Annotation.__table__.insert().values(sae_id=sae_id, feature_index=first, label="<b>the team's</b> label", note=""))
    engine.dispose()
    with TestClient(create_app(url)) as c:
        labels = c.get("/saes/tiny-sae/map/labels.json").json()
        table = c.get("/saes/tiny-sae", params={"offset": first, "limit": 5}).text
    assert "&lt;b&gt;the team&#39;s&lt;/b&gt; label" in table and "<b>the team" not in table
    assert len(labels["labels"]) == len(labels["tokens"])
    assert labels["labels"][0] == "<b>the team's</b> label" and not any(labels["labels"][1:])


def test_a_map_by_coactivation_ties_each_feature_to_its_mined_partners(mined_store, tmp_path):
    """--neighbours coactivation: UMAP's graph is each feature's stored co-firing partners (1 - Jaccard), so
    features that fire together sit together; the same seed gives the same map, and it is told apart from a
    decoder map (a rerun with the other basis asks for --force)."""
    from sae_core.relations.map import coactivation_graph

    url = copy_store(mined_store, tmp_path / "co")
    engine = create_engine(url)
    with engine.connect() as conn:
        run_id = conn.scalar(select(SAE.active_run_id))
        rows = conn.execute(select(Feature.index, Feature.coactivation).where(Feature.run_id == run_id, Feature.n_fired > 0)).all()
        live = sorted(r[0] for r in rows)
        knn, dist = coactivation_graph(conn, run_id, live, 6)
    engine.dispose()
    partners = {index: co for index, co in rows}
    for i, index in enumerate(live):
        assert knn[i, 0] == i and dist[i, 0] == 0
        expected = [(live.index(p[0]), 1 - p[3]) for p in partners[index] if p[0] in set(live)][:5]
        got = [(int(q), float(d)) for q, d in zip(knn[i, 1:], dist[i, 1:]) if q >= 0]
        assert [q for q, _ in got] == [q for q, _ in expected], index
        assert [d for _, d in got] == pytest.approx([d for _, d in expected], abs=1e-6), index
    cfg = MapConfig(db=url, neighbours="coactivation", n_neighbors=6, min_cluster_size=5)
    first = build_map("tiny-sae", cfg)
    assert first.n_points == len(live) and not first.skipped
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.scalar(select(FeatureMap.config))["metric"] == "coactivation jaccard"
    engine.dispose()
    layout = points(url)
    again = build_map("tiny-sae", MapConfig(db=url, neighbours="coactivation", n_neighbors=6, min_cluster_size=5, force=True))
    assert not again.skipped and points(url) == layout  # the same seed: the same map
    with pytest.raises(SaescopeError, match="other settings"):
        build_map("tiny-sae", MapConfig(db=url, n_neighbors=6, min_cluster_size=5))  # decoder now: a different map
    with pytest.raises(SaescopeError, match="lower --n-neighbors"):
        build_map("tiny-sae", MapConfig(db=url, neighbours="coactivation", n_neighbors=60, force=True))
    with pytest.raises(SaescopeError, match="decoder or coactivation"):
        build_map("tiny-sae", MapConfig(db=url, neighbours="cosine"))
