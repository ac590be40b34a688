"""Annotations and feature lists in a real browser (Playwright + Debian's chromium, CSP on): sign in,
annotate a feature with hostile Markdown (it renders inert), build a list, share it by link with a common
text (the owner sees each entry's activations on it, from the live model), and open the link in a fresh
context with no session: the entry and its note are there, and under --anonymous read a note instead of the
activations (the model is for signed-in users). No console error and no script run (the `page` fixture checks)."""

from __future__ import annotations

import sqlite3
import uuid

import pytest
from conftest import PG_URL, LiveServer, mine_tiny, pg_url_or_skip
from sqlalchemy import create_engine, text
from test_browser import page  # noqa: F401  (fixture; `browser` comes from conftest)
from test_live_api import LIMITS

from app.accounts import store
from app.config import AppConfig
from app.main import create_app
from sae_core.config import AuthConfig
from sae_core.store import db

PASSWORD = "correct horse battery"
ADMIN = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")  # connects on first use only
NOTE = "Fires on *quotes*.\n\n<script>alert('note')</script> <img src=x onerror=alert(2)> [bad](javascript:alert(3)) <!-- c -->"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, mined_store, tiny_sae_dir, tiny_lm, tmp_path_factory):
    """A --auth server with the tiny mined SAE and an editor, on a copy of the SQLite store or in a fresh
    PostgreSQL schema (the tiny SAE mined there)."""
    schema = None
    if request.param == "sqlite":
        copy = tmp_path_factory.mktemp("annotations-store") / "store.db"
        with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        url = f"sqlite:///{copy}"
    else:
        pg_url_or_skip()
        schema = f"t_{uuid.uuid4().hex[:10]}"
        with ADMIN.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        mine_tiny(tiny_sae_dir, tiny_lm, url)
    with store.transaction(db.make_engine(url)) as conn:
        store.add_user(conn, "ada", PASSWORD, "editor")
    live = LiveServer(create_app(config=AppConfig.resolve(url, live=LIMITS, auth=AuthConfig(auth=True))))
    yield live.url
    live.stop()
    if schema is not None:
        with ADMIN.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def test_annotate_build_a_list_share_it_and_open_the_link_elsewhere(server, page, browser):  # noqa: F811
    page.goto(f"{server}/account/login?next=/saes/tiny-sae/features/3")
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", PASSWORD)
    page.click("form button[type=submit]")
    page.wait_for_url(f"{server}/saes/tiny-sae/features/3")

    page.wait_for_selector("#annotate form.annotation-form")  # the editor's form, loaded by htmx
    page.fill("#annotate input[name=label]", "quotation marks")
    page.fill("#annotate textarea[name=note]", NOTE)
    page.click("#annotate form.annotation-form button[type=submit]")
    page.wait_for_url(f"{server}/saes/tiny-sae/features/3")
    page.wait_for_selector("#annotation .annotation-label:has-text('quotation marks')")
    note = page.locator("#annotation .annotation-note")
    assert note.locator("em").inner_text() == "quotes"
    assert note.locator("script, img, [onerror]").count() == 0 and "alert('note')" in note.inner_text()  # shown as text
    assert page.locator("#annotation a[href^='javascript']").count() == 0
    page.goto(f"{server}/saes/tiny-sae")
    page.wait_for_selector("#labels td:has-text('quotation marks')")

    page.goto(f"{server}/lists")
    page.fill("form.new-list input[name=name]", "dialogue features")
    page.select_option("form.new-list select[name=visibility]", "link")
    page.click("form.new-list button[type=submit]")
    page.wait_for_selector("h1:has-text('dialogue features')")
    page.fill("form.edit-list input[name=common_text]", "The cat said that the king ran.")
    page.click("form.edit-list button[type=submit]")
    page.wait_for_selector("q:has-text('The cat said')")

    page.goto(f"{server}/saes/tiny-sae/features/3")
    page.wait_for_selector("#add-to-list")
    page.fill("#add-to-list input[name=note]", "the clearest one")
    page.click("#add-to-list button:has-text('dialogue features')")
    page.wait_for_selector("tr.entry a:has-text('tiny-sae #3')")
    share = page.get_attribute("#share-link", "href")
    assert share and share.startswith("/lists/shared/")
    for _ in range(60):  # the owner sees activations on the common text, from the live model (which may still be loading)
        if page.locator("tr.entry .live-tokens .tok").count() or "loading" not in page.inner_text("main"):
            break
        page.wait_for_timeout(1500)
        page.reload()
    assert page.locator(".live-off").count() == 0 and page.locator("tr.entry .live-tokens .tok").count() > 0

    # someone with the link and no account, in a fresh browser context
    other = browser.new_context()
    errors: list[str] = []
    visitor = other.new_page()
    visitor.on("pageerror", lambda e: errors.append(str(e)))
    visitor.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    response = visitor.goto(f"{server}{share}")
    assert response is not None and response.status == 200 and "content-security-policy" in response.headers
    visitor.wait_for_selector("h1:has-text('dialogue features')")
    assert visitor.locator("tr.entry td:has-text('the clearest one')").count() == 1
    # under --anonymous read the model is not theirs to run: the list without activations, and why
    assert "sign in to see them" in visitor.inner_text(".live-off") and visitor.locator("tr.entry .live-tokens .tok").count() == 0
    assert visitor.locator("main form[method=post]").count() == 0 and visitor.locator("#share-link").count() == 0
    visitor.goto(f"{server}/saes/tiny-sae/features/3")
    visitor.wait_for_selector("#annotation .annotation-label:has-text('quotation marks')")
    other.close()
    assert not errors, errors
