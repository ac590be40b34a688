"""The cache of rendered responses and their gzip form (app/response_cache.py, wired in app/http.py)."""

from __future__ import annotations

import gzip
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.response_cache import ENV_CACHE_MB, Entry, ResponseCache, accepts_gzip, gzip_entry
from conftest import mine_tiny
from sae_core.errors import SaescopeError

GZ = {"Accept-Encoding": "gzip"}
PLAIN = {"Accept-Encoding": "identity"}


def test_lru_keeps_within_its_bytes():
    cache = ResponseCache(1000)
    for i in range(20):
        cache.put(("k", i), Entry([], b"x" * 100))
        assert cache.bytes <= 1000
    assert len(cache) == 10 and cache.get(("k", 0)) is None and cache.get(("k", 19)) is not None
    cache.get(("k", 10))                            # recently used: survives the next evictions
    cache.put(("k", 20), Entry([], b"y" * 200))
    assert cache.get(("k", 10)) is not None and cache.get(("k", 11)) is None
    cache.put(("huge",), Entry([], b"z" * 300))     # over a quarter of the cache: not kept
    assert cache.get(("huge",)) is None


def test_accept_encoding_and_small_bodies():
    assert accepts_gzip("gzip, deflate, br") and accepts_gzip("br;q=1.0, gzip;q=0.8") and accepts_gzip("*")
    assert not accepts_gzip(None) and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")
    html = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", b"4000")]
    packed = gzip_entry(html, b"<p>token</p>" * 400)
    assert dict(packed.headers)[b"content-encoding"] == b"gzip" and gzip.decompress(packed.body) == b"<p>token</p>" * 400
    assert int(dict(packed.headers)[b"content-length"]) == len(packed.body) < 4000
    assert gzip_entry(html, b"<p>short</p>").body == b"<p>short</p>"                       # too small to gain
    assert gzip_entry([(b"content-type", b"image/png")], b"\x89PNG" * 500).body == b"\x89PNG" * 500


@pytest.fixture
def client(mined_store):
    with TestClient(create_app(mined_store)) as c:
        yield c


@pytest.mark.parametrize("path", ["/saes/tiny-sae/features/3", "/api/v1/saes/tiny-sae/features/3/examples?limit=50", "/"])
def test_miss_then_hit_and_gzip_is_the_same_content(client, path):
    first = client.get(path, headers=GZ)
    again = client.get(path, headers=GZ)
    assert first.headers["x-saescope-cache"] == "miss" and again.headers["x-saescope-cache"] == "hit"
    assert first.content == again.content and first.headers["etag"] == again.headers["etag"]
    plain = client.get(path, headers=PLAIN)
    assert "content-encoding" not in plain.headers and plain.content == first.content     # httpx decompressed the gzip one
    if len(plain.content) >= 1024:
        assert first.headers["content-encoding"] == "gzip" and first.headers["etag"] != plain.headers["etag"]
        assert int(first.headers["content-length"]) < len(plain.content)
    assert "Accept-Encoding" in first.headers["vary"]
    # either representation's tag revalidates
    assert client.get(path, headers={**GZ, "If-None-Match": plain.headers["etag"]}).status_code == 304
    assert client.get(path, headers={**PLAIN, "If-None-Match": first.headers["etag"]}).status_code == 304


def test_errors_and_other_paths_are_not_cached(client):
    assert "x-saescope-cache" not in client.get("/saes/tiny-sae/features/999", headers=GZ).headers
    assert client.get("/saes/tiny-sae/features/999", headers=GZ).status_code == 404
    static = client.get("/static/htmx.min.js", headers=GZ)
    assert static.headers["content-encoding"] == "gzip" and "x-saescope-cache" not in static.headers   # gzip middleware


def test_memory_bound(mined_store, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_MB, "1")
    app = create_app(mined_store)
    with TestClient(app) as c:
        for i in range(128):
            c.get(f"/saes/tiny-sae/features/{i}", headers=PLAIN)
            assert app.state.response_cache.bytes <= 1 << 20
    assert len(app.state.response_cache) < 128          # the oldest pages were evicted
    monkeypatch.setenv(ENV_CACHE_MB, "0")
    assert create_app(mined_store).state.response_cache is None
    monkeypatch.setenv(ENV_CACHE_MB, "lots")
    with pytest.raises(SaescopeError, match="whole number of megabytes"):
        create_app(mined_store)


def test_a_re_mine_switches_every_cached_page(tiny_sae_dir, tiny_lm, tmp_path):
    from sae_core.feature_stats import StatsConfig
    from sae_core.mine import MineConfig, mine

    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine_tiny(tiny_sae_dir, tiny_lm, url, windows=32)
    paths = [f"/saes/tiny-sae/features/{i}" for i in range(5)] + ["/api/v1/saes/tiny-sae", "/"]
    with TestClient(create_app(url)) as c:
        before = {p: c.get(p, headers=GZ) for p in paths}
        assert all(c.get(p, headers=GZ).headers["x-saescope-cache"] == "hit" for p in paths)
        stats = StatsConfig(top_n=8, n_intervals=4, per_interval=3, histogram_bins=10, context_before=5, context_after=3)
        mine(tiny_sae_dir, MineConfig(tokens=32 * 48, batch_size=8, windows_per_chunk=16, db=url, device="cpu",
                                      model_dtype="float32", stats=replace(stats, top_n=6), force=True), lm=tiny_lm, progress=False)
        for p in paths:
            after = c.get(p, headers=GZ)
            assert after.headers["x-saescope-cache"] == "miss" and after.headers["etag"] != before[p].headers["etag"], p
        assert c.get("/api/v1/saes/tiny-sae").json()["mined_tokens"] == 48 * 31    # the new run's data, not the cached one
