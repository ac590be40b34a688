"""Annotations and feature lists (issue 31, items 2, 3 and 5) on SQLite and PostgreSQL: editors annotate,
everyone reads; Markdown renders inert; a re-mine keeps the annotations and the page says the examples
changed; lists are private / team / public by link, with no way into another user's private list (IDOR);
export and import; search by full text. The anonymous refusals and CSRF checks of every new route are
also covered by test_accounts.py's sweep over every state-changing route."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from html.parser import HTMLParser

import pytest
from conftest import mine_tiny
from fastapi.testclient import TestClient
from test_accounts import add_key, add_user, csrf, make_app, sign_in

from app.annotations.markdown import render
from app.main import create_app
from sae_core.store import db

EVIL = (
    "<script>alert('x')</script>\n\n"
    '<img src=x onerror="alert(1)">\n\n'
    '[click](javascript:alert(1)) and <a href="javascript:alert(2)">a</a>\n\n'
    "<!-- hidden --> **bold** [ok](https://example.org)"
)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path, mined_store, tiny_sae_dir, tiny_lm):
    """A store holding the tiny SAE's mining run (copied: tests write to it)."""
    if request.param == "sqlite":
        src = sqlite3.connect(mined_store.removeprefix("sqlite:///"))
        with sqlite3.connect(tmp_path / "store.db") as dst:
            src.backup(dst)  # with what the write-ahead log still holds
        src.close()
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        mine_tiny(tiny_sae_dir, tiny_lm, url)
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    return url


def first_sae(url: str) -> str:
    from sqlalchemy import select

    from sae_core.store.schema import SAE as SAERow

    engine = db.make_engine(url)
    with engine.connect() as conn:
        name = conn.scalar(select(SAERow.name).order_by(SAERow.id))
    engine.dispose()
    return name


def signed_in(app, name: str) -> TestClient:
    client = TestClient(app)
    assert sign_in(client, name).status_code == 303
    return client


def put_annotation(client, sae, index, label, note=""):
    return client.put(
        f"/api/v1/saes/{sae}/features/{index}/annotation", json={"label": label, "note": note}, headers={"X-CSRF-Token": csrf(client)}
    )


class _Elements(HTMLParser):
    """Every element, attribute and comment a browser would build from some HTML."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.comments: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_comment(self, data):
        self.comments.append(data)


def assert_inert(html: str) -> None:
    parsed = _Elements(html)
    assert not parsed.comments
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "img", "iframe", "style", "object"), tag
        assert not any(a.startswith("on") or a == "style" for a in attrs), (tag, attrs)
        assert not (attrs.get("href") or "").strip().lower().startswith(("javascript:", "data:", "vbscript:")), attrs


def test_markdown_renders_inert():
    html = str(render(EVIL))
    assert_inert(html)
    assert "<strong>bold</strong>" in html and 'href="https://example.org"' in html and "nofollow" in html
    assert "&lt;script&gt;" in html  # shown as text, not dropped silently
    assert_inert(str(render("[x](JaVaScRiPt:alert(1)) <javascript:alert(1)> [y](data:text/html,<script>)")))


def test_editor_annotates_everyone_reads_with_history(url):
    sae = first_sae(url)
    add_user(url, "ed", "editor")
    add_user(url, "vi", "viewer")
    app = make_app(url, auth=True)
    with signed_in(app, "ed") as ed, signed_in(app, "vi") as vi, TestClient(app) as anon:
        r = put_annotation(ed, sae, 3, "dialogue quotes", EVIL)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["author"] == "ed" and body["revisions"] == 1 and body["examples_changed_at"] is None
        assert_inert(body["note_html"])
        assert put_annotation(ed, sae, 3, "speech in quotes", "second *take*").json()["revisions"] == 2
        # a viewer and an anonymous visitor read it but cannot write
        assert put_annotation(vi, sae, 3, "mine now").status_code == 403
        assert anon.put(f"/api/v1/saes/{sae}/features/3/annotation", json={"label": "x"}).status_code == 401
        assert anon.get(f"/api/v1/saes/{sae}/features/3/annotation").json()["label"] == "speech in quotes"
        history = anon.get(f"/api/v1/saes/{sae}/features/3/annotation/history").json()
        assert [h["label"] for h in history] == ["speech in quotes", "dialogue quotes"] and history[1]["note"] == EVIL
        # the feature page's fragment: inert note, the form only for the editor
        frag = anon.get(f"/saes/{sae}/features/3/annotation").text
        assert "speech in quotes" in frag and "<em>take</em>" in frag and "<form" not in frag
        assert ed.get(f"/saes/{sae}/features/3/annotation").text == frag  # the same for everyone (cached)
        form = ed.get(f"/annotate/{sae}/3")
        assert 'name="label"' in form.text and "speech in quotes" in form.text and form.headers["cache-control"] == "no-store"
        assert 'name="label"' not in vi.get(f"/annotate/{sae}/3").text and anon.get(f"/annotate/{sae}/3").text.strip() == ""
        page = anon.get(f"/saes/{sae}/features/3/annotation/history").text
        assert "&lt;script&gt;" in page
        assert_inert(page.split("<main>")[1])  # the page's own scripts are in its head
        assert_inert(frag)
        assert "speech in quotes" in anon.get(f"/saes/{sae}/labels").text
        # bad input
        assert put_annotation(ed, sae, 10**6, "x").status_code == 404
        assert put_annotation(ed, "no-such-sae", 1, "x").status_code == 404
        assert put_annotation(ed, sae, 1, " ").status_code == 422
        assert put_annotation(ed, sae, 1, "a\x00b").status_code == 422  # PostgreSQL stores no NUL: refused on both
        # full-text search over label and note
        hits = anon.get("/api/v1/annotations/search", params={"q": "quotes"}).json()
        assert [(h["annotation"]["sae"], h["annotation"]["index"]) for h in hits] == [(sae, 3)] and hits[0]["full_text_rank"] == 1
        assert anon.get("/api/v1/annotations/search", params={"q": "zebra"}).json() == []
        assert "speech in quotes" in anon.get("/annotations", params={"q": "speech"}).text


def test_annotation_form_writes_through_the_page(url):
    sae = first_sae(url)
    add_user(url, "ed", "editor")
    app = make_app(url, auth=True)
    with signed_in(app, "ed") as ed:
        r = ed.post(
            f"/saes/{sae}/features/5/annotation",
            data={"label": "commas", "note": "a *note*", "csrf_token": csrf(ed)},
            follow_redirects=False,
        )
        assert r.status_code == 303 and r.headers["location"] == f"/saes/{sae}/features/5"
        assert ed.post(f"/saes/{sae}/features/5/annotation", data={"label": "x"}).status_code == 403  # no CSRF token
        assert ed.post(f"/saes/{sae}/features/5/annotation", data={"label": "x", "csrf_token": "wrong"}).status_code == 403
        assert ed.get(f"/api/v1/saes/{sae}/features/5/annotation").json()["label"] == "commas"


def test_auth_off_shows_annotations_read_only(url):
    sae = first_sae(url)
    add_user(url, "ed", "editor")
    with TestClient(make_app(url, auth=True)) as c:
        assert sign_in(c, "ed").status_code == 303
        assert put_annotation(c, sae, 2, "kept label").status_code == 200
    with TestClient(create_app(url)) as anon:
        assert anon.get(f"/api/v1/saes/{sae}/features/2/annotation").json()["label"] == "kept label"
        frag = anon.get(f"/saes/{sae}/features/2/annotation").text
        assert "kept label" in frag and "<form" not in frag
        assert anon.put(f"/api/v1/saes/{sae}/features/2/annotation", json={"label": "x"}).status_code in (404, 405)
        assert anon.get("/lists").status_code == 404
        assert anon.get(f"/saes/{sae}/features/7/annotation").text.strip() == ""  # no annotation: nothing
        assert anon.get(f"/annotate/{sae}/2").status_code == 404  # no forms with accounts off
        assert "annotate-slot" not in anon.get(f"/saes/{sae}/features/2").text


def test_annotations_survive_a_re_mine(url, tiny_sae_dir, tiny_lm):
    sae = first_sae(url)
    add_user(url, "ed", "editor")
    with TestClient(make_app(url, auth=True)) as ed:
        assert sign_in(ed, "ed").status_code == 303
        assert put_annotation(ed, sae, 4, "before the re-mine", "note").status_code == 200
        assert ed.get(f"/api/v1/saes/{sae}/features/4/annotation").json()["examples_changed_at"] is None
    mine_tiny(tiny_sae_dir, tiny_lm, url, windows=64)  # a new run of the same SAE becomes the active one
    with TestClient(create_app(url)) as anon:
        a = anon.get(f"/api/v1/saes/{sae}/features/4/annotation").json()
        assert a["label"] == "before the re-mine" and a["examples_changed_at"] is not None and a["examples_changed_at"] > a["updated_at"]
        assert "examples on this page changed after this note" in anon.get(f"/saes/{sae}/features/4/annotation").text
        assert "(examples changed)" in anon.get(f"/saes/{sae}/labels").text


def test_lists_private_team_link_and_idor(url):
    sae = first_sae(url)
    add_user(url, "ada", "editor")
    add_user(url, "bob", "editor")
    add_user(url, "vi", "viewer")
    app = make_app(url, auth=True)
    with signed_in(app, "ada") as ada, signed_in(app, "bob") as bob, signed_in(app, "vi") as vi, TestClient(app) as anon:
        h = {"X-CSRF-Token": csrf(ada)}
        body = {"name": "dialogue features", "visibility": "private", "common_text": "", "entries": [
            {"sae": sae, "index": 3, "note": "quotes"}, {"sae": sae, "index": 1, "note": "<script>x</script>"}]}  # fmt: skip
        r = ada.post("/api/v1/lists", json=body, headers=h)
        assert r.status_code == 201, r.text
        lid, share = r.json()["id"], r.json()["share_path"]
        assert [e["index"] for e in r.json()["entries"]] == [3, 1]
        # another user's private list: 404 on every read and write, by API and by page
        bh = {"X-CSRF-Token": csrf(bob)}
        assert bob.get(f"/api/v1/lists/{lid}").status_code == 404
        assert bob.get(f"/lists/{lid}").status_code == 404
        assert bob.put(f"/api/v1/lists/{lid}", json={**body, "name": "mine"}, headers=bh).status_code == 404
        assert bob.delete(f"/api/v1/lists/{lid}", headers=bh).status_code == 404
        assert bob.post(f"/lists/{lid}/entries", data={"sae": sae, "index": 0, "csrf_token": csrf(bob)}).status_code == 404
        assert bob.post(f"/lists/{lid}/delete", data={"csrf_token": csrf(bob)}).status_code == 404
        assert bob.get(f"/api/v1/lists/{lid}/export").status_code == 404
        assert anon.get(share).status_code == 404 and anon.get(f"/api/v1{share}").status_code == 404  # not shared yet
        assert all(x["id"] != lid for x in bob.get("/api/v1/lists").json())
        # a viewer cannot create lists; anonymous cannot list them
        assert vi.post("/api/v1/lists", json=body, headers={"X-CSRF-Token": csrf(vi)}).status_code == 403
        assert anon.get("/api/v1/lists").status_code == 401
        # shared with the team: bob reads it, still cannot edit it
        assert ada.put(f"/api/v1/lists/{lid}", json={**body, "visibility": "team"}, headers=h).status_code == 200
        assert bob.get(f"/api/v1/lists/{lid}").json()["name"] == "dialogue features"
        assert "share_path" not in bob.get(f"/api/v1/lists/{lid}").json() or bob.get(f"/api/v1/lists/{lid}").json()["share_path"] is None
        assert bob.put(f"/api/v1/lists/{lid}", json=body, headers=bh).status_code == 404
        assert anon.get(share).status_code == 404
        # public by link: anyone with the link, read-only; the page renders the entry notes inert
        assert ada.put(f"/api/v1/lists/{lid}", json={**body, "visibility": "link"}, headers=h).status_code == 200
        page = anon.get(share)
        main = page.text.split("<main>")[1]
        assert page.status_code == 200 and "dialogue features" in main and 'method="post"' not in main
        assert_inert(main)
        assert anon.get(f"/api/v1{share}").json()["entries"][0]["note"] == "quotes"
        assert anon.get(share[:-3] + "abc").status_code == 404
        # reorder and remove through the page
        assert ada.post(f"/lists/{lid}/entries/1/move", data={"to": 0, "csrf_token": csrf(ada)}, follow_redirects=False).status_code == 303
        assert [e["index"] for e in ada.get(f"/api/v1/lists/{lid}").json()["entries"]] == [1, 3]
        assert ada.post(f"/lists/{lid}/entries/0/delete", data={"csrf_token": csrf(ada)}, follow_redirects=False).status_code == 303
        assert [e["index"] for e in ada.get(f"/api/v1/lists/{lid}").json()["entries"]] == [3]
        assert ada.post(f"/lists/{lid}/entries", data={"sae": sae, "index": 10**6, "csrf_token": csrf(ada)}).status_code == 404


def test_list_export_import_and_api_key(url):
    sae = first_sae(url)
    add_user(url, "ada", "editor")
    key, _ = add_key(url, "ada")
    app = make_app(url, auth=True)
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as c:
        body = {"name": "layer 1, odd ☃", "description": "*why*", "visibility": "private", "common_text": "the cat sat",
                "entries": [{"sae": sae, "index": 7, "note": "a, b"}, {"sae": sae, "index": 2, "note": ""}]}  # fmt: skip
        r = c.post("/api/v1/lists", json=body, headers=auth)  # a key needs no CSRF token
        assert r.status_code == 201, r.text
        lid = r.json()["id"]
        exported = c.get(f"/api/v1/lists/{lid}/export", headers=auth)
        assert exported.status_code == 200 and exported.json()["format"] == "saescope.feature_list"
        assert exported.headers["content-disposition"] == 'attachment; filename="layer-1--odd--.json"'
        rows = list(csv.reader(io.StringIO(c.get(f"/api/v1/lists/{lid}/export?format=csv", headers=auth).text)))
        assert rows == [["position", "sae", "index", "note"], ["0", sae, "7", "a, b"], ["1", sae, "2", ""]]
        imported = c.post("/api/v1/lists/import", json=exported.json(), headers=auth)
        assert imported.status_code == 201 and imported.json()["id"] != lid
        same = ("name", "description", "common_text", "entries")
        assert {k: imported.json()[k] for k in same} == {k: r.json()[k] for k in same} and imported.json()["visibility"] == "private"
        bad = {**exported.json(), "entries": [{"sae": "no-such-sae", "index": 0}]}
        assert c.post("/api/v1/lists/import", json=bad, headers=auth).status_code == 404
        for nul in (
            {"name": "a\x00"},
            {"entries": [{"sae": "x\x00", "index": 0}]},
            {"entries": [{"sae": sae, "index": 0, "note": "\x00"}]},
        ):
            assert c.post("/api/v1/lists/import", json={**exported.json(), **nul}, headers=auth).status_code == 422
        assert c.post("/api/v1/lists/import", json={**exported.json(), "format": "other"}, headers=auth).status_code == 422
        # the list page with live off says why it shows no activations
        page = c.get(f"/lists/{lid}", headers=auth)
        assert page.status_code == 200 and "Activations on the common text are not shown" in page.text
        assert c.get(f"/lists/{lid}/export.csv", headers=auth).text.startswith("position,sae,index,note")


def test_search_by_meaning_finds_what_no_word_matches(url):
    from sae_core.explain.embed import model_dir

    if not model_dir().exists():
        pytest.skip("the sentence-embedding model is not installed (make venv installs it): search is full text alone")
    sae = first_sae(url)
    add_user(url, "ed", "editor")
    with TestClient(make_app(url, auth=True)) as ed:
        assert sign_in(ed, "ed").status_code == 303
        assert put_annotation(ed, sae, 3, "dialogue", "quotation marks around what a character says").status_code == 200
        assert put_annotation(ed, sae, 5, "numbers", "digits and counting words").status_code == 200
        hits = ed.get("/api/v1/annotations/search", params={"q": "speech spoken by people"}).json()
        assert hits[0]["annotation"]["index"] == 3 and hits[0]["semantic_rank"] == 1 and hits[0]["full_text_rank"] is None
        hits = ed.get("/api/v1/annotations/search", params={"q": "digits", "sae": sae}).json()
        assert hits[0]["annotation"]["index"] == 5 and hits[0]["full_text_rank"] == 1


# ---------------------------------------------------------------------- the list page and the model


@pytest.fixture
def model(url):
    """A real model process over the test's store, which several apps (different --auth settings) share."""
    import asyncio

    from test_live_api import LIMITS

    from sae_core.live.errors import Loading
    from sae_core.live.pool import LiveClient, ModelPool

    with ModelPool(url, LIMITS) as pool:
        client, deadline = LiveClient(pool.socket), time.time() + 90
        while True:
            try:
                if asyncio.run(client.call({"op": "status"}))["state"] == "ready":
                    break
            except Loading:
                pass
            assert time.time() < deadline, "the model process did not become ready"
            time.sleep(0.3)
        yield pool.socket


def live_app(url: str, socket: str, **auth):
    """An app on the shared model process; its gateway's calls go to the model and are recorded."""
    from test_live_api import LIMITS

    from app.config import AppConfig
    from app.live.gateway import LiveLink
    from sae_core.config import AuthConfig

    app = create_app(config=AppConfig.resolve(url, live=LiveLink(LIMITS, socket=socket), auth=AuthConfig(**auth)))
    real, calls = app.state.live.call, []

    async def recorded(request, payload):
        calls.append(payload)
        return await real(request, payload)

    app.state.live.call = recorded
    return app, calls


def usage(url: str) -> dict[str, tuple[int, int]]:
    """Model requests and refusals per client (sign-ins count in a bucket of their own)."""
    from app.accounts import store as accounts_store

    with db.make_engine(url).connect() as conn:
        return {u.subject: (u.requests, u.refused) for u in accounts_store.usage(conn) if u.bucket == "live"}


def same_minute() -> None:
    """Wait for a fresh minute if this one ends soon: the limits count in fixed one-minute windows."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def shown(page) -> int:
    return page.text.count('class="context live-tokens"')


TEXT = "The cat sat over the big red house. Then the king said that the whale ran."


def test_list_page_runs_the_model_batched_cached_and_metered(url, model):
    """Under --anonymous read a visitor with the link runs no model and is told why; the owner's view asks
    the model once for all entries of the SAE and counts one model request; a cached view costs nothing;
    past the per-minute limit the page says so instead of showing activations."""
    sae = first_sae(url)
    ada_id = add_user(url, "ada", "editor")
    app, calls = live_app(url, model, auth=True, live_per_minute=2)
    same_minute()
    with signed_in(app, "ada") as ada, TestClient(app) as anon:
        h = {"X-CSRF-Token": csrf(ada)}
        body = {"name": "three", "visibility": "link", "common_text": TEXT,
                "entries": [{"sae": sae, "index": 7}, {"sae": sae, "index": 2}, {"sae": sae, "index": 3}]}  # fmt: skip
        r = ada.post("/api/v1/lists", json=body, headers=h)
        lid, share = r.json()["id"], r.json()["share_path"]
        page = anon.get(share)
        assert page.status_code == 200 and "Activations on the common text are not shown" in page.text
        assert "sign in to see them" in page.text and shown(page) == 0
        assert calls == [] and usage(url) == {}

        page = ada.get(f"/lists/{lid}")
        assert shown(page) == 3 and "not shown" not in page.text
        assert [(c["op"], c["sae"], c["features"]) for c in calls] == [("encode", sae, [2, 3, 7])]  # one call for the SAE
        assert usage(url) == {f"user:{ada_id}": (1, 0)}
        assert shown(ada.get(share)) == 3 and len(calls) == 1 and usage(url) == {f"user:{ada_id}": (1, 0)}  # cached: no model, no count

        # each edit is a new version: the next view asks the model again, and the third is past the limit
        assert ada.put(f"/api/v1/lists/{lid}", json={**body, "common_text": TEXT + " Again."}, headers=h).status_code == 200
        assert shown(ada.get(f"/lists/{lid}")) == 3 and len(calls) == 2
        assert ada.put(f"/api/v1/lists/{lid}", json={**body, "common_text": TEXT + " Once more."}, headers=h).status_code == 200
        page = ada.get(f"/lists/{lid}")
        assert page.status_code == 200 and shown(page) == 0 and len(calls) == 2
        assert "your account has used its 2 model requests this minute; they show again in" in page.text
        assert usage(url) == {f"user:{ada_id}": (2, 1)}


def test_list_page_under_anonymous_live_is_metered_per_address(url, model):
    from app.accounts.store import transaction
    from app.annotations import store as lists

    sae = first_sae(url)
    ada_id = add_user(url, "ada", "editor")
    with transaction(db.make_engine(url)) as conn:
        first = lists.create_list(conn, ada_id, "a", "", "link", TEXT, [lists.Entry(sae, 1), lists.Entry(sae, 4)])
        second = lists.create_list(conn, ada_id, "b", "", "link", TEXT, [lists.Entry(sae, 5)])
        tokens = [lists.get_list(conn, i, ada_id).token for i in (first, second)]
    app, calls = live_app(url, model, auth=True, anonymous="live", live_per_minute_address=1)
    same_minute()
    with TestClient(app) as anon:
        assert shown(anon.get(f"/lists/shared/{tokens[0]}")) == 2 and len(calls) == 1
        page = anon.get(f"/lists/shared/{tokens[1]}")
        assert shown(page) == 0 and "your address has used its 1 model requests this minute" in page.text and len(calls) == 1
        assert shown(anon.get(f"/lists/shared/{tokens[0]}")) == 2 and len(calls) == 1  # the first list's answer is cached
    assert usage(url) == {"addr:testclient": (1, 1)}


def test_activation_cache_expires_and_stays_within_its_size():
    from array import array

    from app.annotations.activations import ActivationCache, Encoded

    def answer(n_tokens: int) -> Encoded:
        return Encoded(tuple("t" * n_tokens), {3: array("f", [1.0] * n_tokens)})

    cache = ActivationCache(ttl_s=10, max_values=10)
    cache.put((1, "v1", "text", "sae"), answer(4), now=0)
    assert cache.get((1, "v1", "text", "sae"), now=9) is not None and cache.get((1, "v2", "text", "sae"), now=9) is None
    assert cache.get((1, "v1", "text", "sae"), now=10) is None and cache.values == 0  # expired, and dropped
    cache.put((1, "a", "t", "s"), answer(4), now=0)
    cache.put((1, "b", "t", "s"), answer(4), now=0)
    cache.get((1, "a", "t", "s"), now=1)  # used last: kept
    cache.put((1, "c", "t", "s"), answer(4), now=1)
    assert [k[1] for k in cache.entries] == ["a", "c"] and cache.values == 8
    cache.put((1, "d", "t", "s"), answer(11), now=1)  # larger than the whole cache: not kept
    assert [k[1] for k in cache.entries] == ["a", "c"]
