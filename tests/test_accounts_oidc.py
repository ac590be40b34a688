"""OIDC sign-in against a real OpenID Connect provider: npm's oidc-provider run by Node on this machine
(authorization code + PKCE, the ID token checked by Authlib). Skipped where Node or npm is missing."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from html import unescape
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer

from app.accounts import store
from app.config import AppConfig
from app.main import create_app
from sae_core.config import AuthConfig
from sae_core.store import db

OIDC_PROVIDER = "oidc-provider@9.13.3"
HERE = Path(__file__).resolve().parent
INSTALL = HERE.parent / ".saescope" / "oidc-provider"  # shared across runs, like the demo corpus
SECRET = "a-client-secret-for-tests"


@pytest.fixture(scope="session")
def provider_dir() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node and npm are needed to run the OIDC provider (npm's oidc-provider)")
    if not (INSTALL / "node_modules" / "oidc-provider").exists():
        INSTALL.mkdir(parents=True, exist_ok=True)
        (INSTALL / "package.json").write_text('{"private": true}\n')
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", OIDC_PROVIDER], cwd=INSTALL, capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"npm could not install {OIDC_PROVIDER}: {proc.stderr[-300:]}")
    shutil.copy(HERE / "oidc_provider.mjs", INSTALL / "oidc_provider.mjs")  # imports resolve from the script's folder
    return INSTALL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def provider(provider_dir):
    """(issuer URL, a function starting the provider for a redirect URI)."""
    port = free_port()
    procs = []

    def start(redirect_uri: str) -> None:
        proc = subprocess.Popen(
            ["node", "oidc_provider.mjs", str(port), redirect_uri, SECRET],
            cwd=provider_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "the OIDC provider did not start"

    yield f"http://127.0.0.1:{port}", start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def submit(client: httpx.Client, page: httpx.Response, **fields) -> httpx.Response:
    """Post the page's first form with its hidden fields and `fields` (the provider's sign-in and consent screens)."""
    form = re.search(r"<form[^>]*action=\"([^\"]+)\"[^>]*>(.*?)</form>", page.text, re.S)
    assert form, page.text[:500]
    data = {n: unescape(v) for n, v in re.findall(r"<input[^>]*type=\"hidden\"[^>]*name=\"([^\"]+)\"[^>]*value=\"([^\"]*)\"", form[2])}
    return client.post(httpx.URL(str(page.url)).join(unescape(form[1])), data={**data, **fields}, follow_redirects=True)


def sign_in_through_provider(client: httpx.Client, base: str, login: str) -> httpx.Response:
    page = client.get(f"{base}/account/oidc?next=/account", follow_redirects=True)
    assert "/interaction/" in str(page.url), page.text[:300]
    page = submit(client, page, login=login, password="anything")  # the provider's development sign-in
    if "/interaction/" in str(page.url):  # its consent screen
        page = submit(client, page)
    return page


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_oidc_sign_in_against_a_real_provider(backend, provider, tmp_path, request, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    db.upgrade(db.make_engine(url))
    issuer, start = provider
    auth = AuthConfig(auth=True, oidc_issuer=issuer, oidc_client_id="saescope", oidc_role="viewer", oidc_name="Test SSO")
    monkeypatch.setenv("SAESCOPE_OIDC_CLIENT_SECRET", SECRET)
    app = create_app(config=AppConfig.resolve(url, auth=auth))
    server = LiveServer(app)
    try:
        start(f"{server.url}/account/oidc/callback")
        with httpx.Client(timeout=30) as client:
            login_page = client.get(f"{server.url}/account/login")
            assert "Sign in with Test SSO" in login_page.text
            page = sign_in_through_provider(client, server.url, "grace")
            assert page.status_code == 200 and str(page.url) == f"{server.url}/account", (page.url, page.text[:500])
            me = client.get(f"{server.url}/api/v1/me").json()
            assert me == {"username": "grace", "role": "viewer", "via": "session", "key_id": None}
        with db.make_engine(url).connect() as conn:
            users = {u.username: u for u in store.list_users(conn)}
            linked = conn.exec_driver_sql("SELECT oidc_issuer, oidc_subject, password_hash FROM users WHERE username = 'grace'").one()
        assert tuple(linked) == (issuer, "grace", None)  # the provider's subject (its account id), and no password
        # the same person again is the same user; a local user's name is never taken over
        with store.transaction(db.make_engine(url)) as conn:
            store.add_user(conn, "alan", "a local password", "admin")
        with httpx.Client(timeout=30) as client:
            sign_in_through_provider(client, server.url, "grace")
            assert client.get(f"{server.url}/api/v1/me").json()["username"] == "grace"
        with httpx.Client(timeout=30) as client:
            sign_in_through_provider(client, server.url, "alan")
            assert client.get(f"{server.url}/api/v1/me").json() == {
                "username": "alan-2",
                "role": "viewer",
                "via": "session",
                "key_id": None,
            }
        with db.make_engine(url).connect() as conn:
            assert len(store.list_users(conn)) == len(users) + 2
        # a forged callback (no state of ours) signs nobody in
        with httpx.Client(timeout=30) as client:
            r = client.get(f"{server.url}/account/oidc/callback?code=x&state=y")
            assert "did not sign you in" in r.text and client.get(f"{server.url}/api/v1/me").status_code == 401
    finally:
        server.stop()
        time.sleep(0.1)
