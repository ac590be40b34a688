"""Accounts in a real browser (Playwright + Debian's chromium, CSP on): sign in from the top bar, use the
model through an htmx form (its CSRF header comes from static/accounts.js), make an API key and see it
once, revoke it, sign out; no console error and no script run anywhere (the `page` fixture checks)."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from conftest import LiveServer
from test_browser import page  # noqa: F401  (fixture; `browser` comes from conftest)
from test_live_api import LIMITS

from app.accounts import store
from app.config import AppConfig
from app.main import create_app
from sae_core.config import AuthConfig
from sae_core.store import db

PASSWORD = "correct horse battery"
TEXT = "The cat sat over the big red house."


@pytest.fixture(scope="module")
def server(mined_store, tmp_path_factory):
    copy = tmp_path_factory.mktemp("accounts-store") / "store.db"
    with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)  # the shared store stays without users
    url = f"sqlite:///{copy}"
    with store.transaction(db.make_engine(url)) as conn:
        store.add_user(conn, "ada", PASSWORD, "editor")
    live = LiveServer(create_app(config=AppConfig.resolve(url, live=LIMITS, auth=AuthConfig(auth=True))))
    yield live.url
    live.stop()


def test_sign_in_use_the_model_make_and_revoke_a_key_sign_out(server, page):  # noqa: F811
    page.goto(f"{server}/saes/tiny-sae/features/3")
    page.click("header .account-nav >> text=Sign in")  # the nav fragment htmx loaded
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", PASSWORD)
    page.click("form button[type=submit]")
    page.wait_for_url(f"{server}/saes/tiny-sae/features/3")  # back where the reader was
    page.wait_for_selector("header .account-nav >> text=ada")
    session = next(c for c in page.context.cookies() if c["name"] == "saescope_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax"

    # an htmx POST to the model: accepted with the CSRF header accounts.js adds (without it: a 403 card)
    page.fill("#try-text textarea", TEXT)
    page.click("#try-text button[type=submit]")
    page.wait_for_selector("#try-result .tok, #try-result .live-error", timeout=90_000)
    while page.locator("#try-result .live-loading").count():  # the model may still be loading: the card retries
        page.wait_for_timeout(500)
    page.wait_for_selector("#try-result .tok", timeout=90_000)
    assert page.locator("#try-result .live-error").count() == 0

    page.click("header .account-nav >> text=ada")
    page.wait_for_selector("h2:has-text('API keys')")
    page.fill("input[name=name]", "browser test")
    page.click("text=Create a key")
    key = page.inner_text("#new-key-value")
    assert key.startswith("ssk_")
    me = httpx.get(f"{server}/api/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.status_code == 200 and me.json()["username"] == "ada"
    page.goto(f"{server}/account")
    assert key not in page.content()  # shown once
    page.click("#keys button:has-text('Revoke')")
    page.wait_for_selector("#keys td:has-text('revoked')")
    assert httpx.get(f"{server}/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 401

    page.click("#logout button")
    page.wait_for_url(f"{server}/")
    page.wait_for_selector("header .account-nav >> text=Sign in")
    response = page.request.get(f"{server}/account")  # not a navigation: a 401 page would be a console error
    assert response.status == 401 and "content-security-policy" in response.headers


def test_a_wrong_password_says_so_and_keeps_the_form(server, page):  # noqa: F811
    page.goto(f"{server}/account/login")
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", "not the password")
    page.click("form button[type=submit]")
    page.wait_for_selector("#login-error")
    assert "Wrong username or password" in page.inner_text("#login-error")
