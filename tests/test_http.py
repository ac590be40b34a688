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
        assert [m.strip() for m in r.headers["allow"].split(",")].count("HEAD") == 1, r.headers
    r = client.head("/api/v1/steer")  # a POST-only route: no GET, so no HEAD either
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""


# A value for each path parameter of the routes, so that the walk below reaches real pages; a route
# added later with another parameter gets "1" (its 404 must then answer HEAD like GET all the same).
PATH_VALUES = {"sae": "tiny-sae", "index": "3"}
QUERIES = {"/saes/{sae}/jump": "?index=3", "/search": "?q=e", "/api/v1/search": "?q=e"}


def get_routes(app) -> list[str]:
    """Every GET route's path, filled in; routers included into the app are walked (FastAPI >= 0.16x
    keeps them as included routers, older ones as flat routes)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    paths = []
    for route in routes:
        if "GET" not in (route.methods or ()) or route.path is None:
            continue
        filled = re.sub(r"{(\w+)(?::\w+)?}", lambda m: PATH_VALUES.get(m[1], "1"), route.path)
        paths.append(filled + QUERIES.get(route.path, ""))
    return paths


def test_every_get_route_answers_head_like_get(client):
    """RFC 9110: HEAD gets the GET's status and headers (ETag, Content-Length, caching) and no body."""
    paths = get_routes(client.app) + ["/static/style.css", "/saes/nope", "/no/such/page/here"]
    assert {"/", "/saes/tiny-sae/features/3", "/api/v1/saes/tiny-sae/features/3", "/openapi.json"} <= set(paths)
    for path in paths:
        first = client.get(path, follow_redirects=False)  # fills the response cache, so GET and HEAD both hit it
        head = client.head(path, follow_redirects=False)
        get = client.get(path, follow_redirects=False)
        assert head.status_code == get.status_code == first.status_code, (path, head.status_code, get.status_code)
        assert sorted(head.headers.multi_items()) == sorted(get.headers.multi_items()), path
        assert head.content == b"" and (get.content or get.status_code != 200), path  # same Content-Length, above
    etagged = client.head("/saes/tiny-sae/features/3")
    assert etagged.status_code == 200 and etagged.headers["etag"] and int(etagged.headers["content-length"]) > 1000
    again = client.head("/saes/tiny-sae/features/3", headers={"If-None-Match": etagged.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


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


def test_head_over_a_real_server_sends_no_body(mined_store):
    """As `curl -I` sees it through uvicorn: HEAD then GET on one keep-alive connection; a body after the
    HEAD's headers would be read as the GET's answer."""
    import http.client

    from conftest import LiveServer

    server = LiveServer(create_app(mined_store))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("HEAD", "/saes/tiny-sae/features/3")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b"" and int(head.getheader("content-length")) > 1000
        conn.request("GET", "/saes/tiny-sae/features/3")
        get = conn.getresponse()
        body = get.read()
        assert get.status == 200 and len(body) == int(head.getheader("content-length")) and get.getheader("etag") == head.getheader("etag")
        conn.close()
    finally:
        server.stop()


def test_nul_in_a_path_or_query_is_a_400_not_a_500_on_postgresql(pg_url):
    """PostgreSQL stores no NUL in text: a NUL that reached a query there was a 500 (the search API's q)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from sae_core.store import db as store_db

    store_db.upgrade(store_db.make_engine(pg_url))
    with TestClient(create_app(pg_url)) as pg_client:
        assert pg_client.get("/api/v1/search", params={"q": "whale"}).status_code == 200
        for path in ("/api/v1/search?q=wh%00ale", "/search?q=%00", "/api/v1/saes/a%00b", "/compare?saes=a%00b"):
            r = pg_client.get(path)
            assert r.status_code == 400, (path, r.status_code, r.text[:200])
            assert "NUL" in r.json()["detail"]
