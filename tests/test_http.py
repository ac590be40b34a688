"""HTTP behaviour of every response (app/http.py): security headers, no inline script or style for
the CSP to refuse, the error contract (422 shape, 405 Allow), and ETag / 304 / Cache-Control."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from app.http import CSP
from app.main import create_app
from conftest import mine_tiny

PAGES = ["/", "/saes/tiny-sae", "/saes/tiny-sae/features/3", "/saes/tiny-sae/features/3/examples?kind=interval&limit=500",
         "/search?q=e", "/saes/nope", "/docs"]


@pytest.fixture(scope="module")
def client(mined_store):
    with TestClient(create_app(mined_store)) as c:
        yield c


@pytest.mark.parametrize("path", PAGES + ["/api/v1/saes/tiny-sae", "/api/v1/health", "/static/style.css"])
def test_security_headers_on_every_response(client, path):
    r = client.get(path)
    assert r.headers["content-security-policy"] == CSP
    assert "script-src 'self';" in CSP and "style-src 'self';" in CSP and "frame-ancestors 'none'" in CSP
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "same-origin"


@pytest.mark.parametrize("path", PAGES)
def test_pages_hold_no_inline_script_handler_or_style(client, path):
    html = client.get(path).text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html) and not re.search(r"<style[\s>]", html), "inline style"
    assert not re.search(r'href\s*=\s*"javascript:', html)


def test_htmx_may_not_eval_or_run_swapped_scripts(client):
    html = client.get("/").text
    config = re.search(r"<meta name=\"htmx-config\" content='([^']*)'>", html).group(1)
    assert '"allowEval": false' in config and '"allowScriptTags": false' in config and '"includeIndicatorStyles": false' in config


def test_405_names_the_allowed_methods(client):
    for path in ("/api/v1/saes/tiny-sae", "/saes/tiny-sae/features/3"):
        r = client.post(path)
        assert r.status_code == 405 and "GET" in r.headers["allow"], (path, r.headers)


def test_422_matches_fastapis_documented_validation_error(client):
    r = client.get("/api/v1/search", params={"q": "a", "sae": "x" * 201})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["query", "sae"] and "at most 200 characters" in error["msg"] and error["type"]
    schema = client.get("/openapi.json").json()
    assert "422" in schema["paths"]["/api/v1/search"]["get"]["responses"]
    assert "404" in schema["paths"]["/api/v1/saes/{sae}/features/{index}"]["get"]["responses"]


@pytest.mark.parametrize("path", ["/saes/tiny-sae/features/3", "/api/v1/saes/tiny-sae/features/3",
                                  "/api/v1/saes/tiny-sae/features/3/examples", "/", "/api/v1/search?q=e", "/saes/tiny-sae"])
def test_conditional_requests_answer_304(client, path):
    first = client.get(path)
    tag = first.headers["etag"]
    assert first.status_code == 200 and tag.startswith('"') and "max-age=" in first.headers["cache-control"]
    again = client.get(path, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
    assert client.get(path, headers={"If-None-Match": '"stale"'}).status_code == 200
    assert client.get(path, headers={"If-None-Match": f'W/"x", {tag}'}).status_code == 304


def test_etag_depends_on_request_and_htmx_fragment(client):
    a = client.get("/saes/tiny-sae/features/3").headers["etag"]
    b = client.get("/saes/tiny-sae/features/4").headers["etag"]
    full = client.get("/saes/tiny-sae?sort=density").headers
    fragment = client.get("/saes/tiny-sae?sort=density", headers={"HX-Request": "true"}).headers
    assert a != b and full["etag"] != fragment["etag"] and "HX-Request" in full["vary"]


def test_errors_and_health_are_not_cached(client):
    assert "etag" not in client.get("/saes/nope").headers and client.get("/saes/nope").headers["cache-control"] == "no-store"
    assert client.get("/api/v1/health").headers["cache-control"] == "no-store"
    assert "etag" not in client.get("/saes/tiny-sae/jump?index=3", follow_redirects=False).headers


def test_etag_changes_when_the_sae_is_re_mined(tiny_sae_dir, tiny_lm, tmp_path):
    from sae_core.mine import MineConfig, mine

    url = f"sqlite:///{tmp_path / 'store.db'}"
    first = mine_tiny(tiny_sae_dir, tiny_lm, url, windows=32)
    with TestClient(create_app(url)) as c:
        before = {p: c.get(p).headers["etag"] for p in ("/saes/tiny-sae/features/3", "/api/v1/saes/tiny-sae", "/")}
        cfg = MineConfig(tokens=32 * 32, batch_size=8, windows_per_chunk=16, db=url, device="cpu", model_dtype="float32",
                         stats=replace(first_stats(), top_n=8), force=True)
        second = mine(tiny_sae_dir, cfg, lm=tiny_lm, progress=False)
        assert second.run_id != first.run_id
        for path, tag in before.items():
            r = c.get(path, headers={"If-None-Match": tag})
            assert r.status_code == 200 and r.headers["etag"] != tag, path


def first_stats():
    from sae_core.feature_stats import StatsConfig

    return StatsConfig(top_n=8, n_intervals=4, per_interval=3, histogram_bins=10, context_before=5, context_after=3)
