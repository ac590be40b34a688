"""Accounts (issue 31): off by default; with --auth, sessions, CSRF, roles, API keys, login lockout and the
model's fair-use limits, on SQLite and on PostgreSQL. The limits are checked on the model endpoints of a
store with no SAE: the middleware counts a request before its route runs (a 404 counts like an answer)."""

from __future__ import annotations

import re
import stat

import pytest
from fastapi.testclient import TestClient

from app.accounts import store
from app.accounts.middleware import routes
from app.accounts.sessions import CSRF_COOKIE, SESSION_COOKIE, secret_key
from app.config import AppConfig
from app.main import create_app
from sae_core.config import AuthConfig
from sae_core.store import db

PASSWORD = "correct horse battery"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
STEER = {"sae": "no-such-sae", "prompt": "Hello", "interventions": []}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    return url


def make_app(url: str, **auth):
    return create_app(config=AppConfig.resolve(url, auth=AuthConfig(**auth)))


def add_user(url: str, name: str = "ada", role: str = "viewer", password: str = PASSWORD) -> int:
    with store.transaction(db.make_engine(url)) as conn:
        return store.add_user(conn, name, password, role)


def add_key(url: str, name: str = "ada") -> tuple[str, int]:
    with store.transaction(db.make_engine(url)) as conn:
        key, row = store.add_key_for(conn, name, "test")
    return key, row.id


def csrf(client: TestClient) -> str:
    """The CSRF token of the client's session (the nav fragment issues one, as every page's htmx does)."""
    if CSRF_COOKIE not in client.cookies:
        assert client.get("/account/nav").status_code == 200
    return client.cookies[CSRF_COOKIE]


def sign_in(client: TestClient, name: str = "ada", password: str = PASSWORD, **extra):
    return client.post(
        "/account/login", data={"username": name, "password": password, "csrf_token": csrf(client), **extra}, follow_redirects=False
    )


def refused(r) -> bool:
    """The sign-in form again, with the reason, and no session."""
    return r.status_code == 200 and 'id="login-error"' in r.text and SESSION_COOKIE + "=" not in str(r.headers.get_list("set-cookie"))


def unsafe_routes(app) -> list[tuple[str, str]]:
    out = []
    for route in routes(app):
        for method in sorted(UNSAFE & (getattr(route, "methods", None) or set())):
            out.append((method, re.sub(r"\{[^}]+\}", "1", route.path)))
    return out


def test_off_by_default_the_atlas_is_as_before(url):
    app = create_app(url)
    assert not app.state.accounts.config.auth
    with TestClient(app) as client:
        home = client.get("/")
        assert home.status_code == 200 and "accounts.js" not in home.text and "set-cookie" not in home.headers
        assert client.get("/account/login").status_code in (404, 422)
        assert client.get("/api/v1/me").status_code == 404
        assert "/api/v1/me" not in client.get("/openapi.json").json()["paths"]
        # a model endpoint is not limited, and needs neither key nor CSRF token
        for _ in range(3):
            assert client.post("/api/v1/steer", json=STEER).status_code == 404


def test_every_state_changing_route_refuses_anonymous(url):
    app = make_app(url, auth=True)
    routes = [r for r in unsafe_routes(app) if r[1] != "/account/login"]
    assert ("POST", "/account/keys") in routes and ("DELETE", "/api/v1/keys/1") in routes and ("POST", "/api/v1/steer") in routes
    with TestClient(app) as bare, TestClient(app) as client:
        for method, path in routes:
            # without any cookie, and with an anonymous session and its valid CSRF token
            assert bare.request(method, path).status_code == 401, (method, path)
            r = client.request(method, path, headers={"X-CSRF-Token": csrf(client)})
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])


def test_every_state_changing_route_refuses_a_missing_or_wrong_csrf_token(url):
    add_user(url, "root", "admin")
    app = make_app(url, auth=True)
    with TestClient(app) as client:
        assert sign_in(client, "root").status_code == 303
        for method, path in unsafe_routes(app):
            for headers in ({}, {"X-CSRF-Token": "wrong"}):
                r = client.request(method, path, headers=headers)
                assert r.status_code == 403 and "CSRF" in r.text, (method, path, headers, r.status_code)
        assert client.post("/account/keys", data={"name": "x", "csrf_token": "wrong"}).status_code == 403
        # the right token, as a header (htmx) or a form field, passes
        assert client.post("/account/keys", data={"name": "laptop", "csrf_token": csrf(client)}).status_code == 200
        assert client.post("/api/v1/keys", json={"name": "notebook"}, headers={"X-CSRF-Token": csrf(client)}).status_code == 201
        # a sign-in needs it too (login CSRF)
        client.cookies.clear()
        assert client.post("/account/login", data={"username": "root", "password": PASSWORD}).status_code == 403


def test_sign_in_sets_a_signed_httponly_lax_session_and_ends_with_sign_out(url):
    add_user(url)
    app = make_app(url, auth=True)
    with TestClient(app) as client:
        anonymous_token = csrf(client)
        r = sign_in(client, next="/account")
        assert r.status_code == 303 and r.headers["location"] == "/account"
        cookies = r.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith(SESSION_COOKIE + "="))
        assert "HttpOnly" in session and "SameSite=Lax" in session and "Secure" not in session
        assert client.cookies[CSRF_COOKIE] != anonymous_token  # a new token at sign-in
        assert client.get("/api/v1/me").json() == {"username": "ada", "role": "viewer", "via": "session", "key_id": None}
        page = client.get("/account")
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        # a tampered cookie is no session
        good = client.cookies[SESSION_COOKIE]
        payload, rest = good.split(".", 1)
        forged = payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + rest
        with TestClient(app) as other:
            assert other.get("/api/v1/me", headers={"Cookie": f"{SESSION_COOKIE}={good}"}).status_code == 200
            assert other.get("/api/v1/me", headers={"Cookie": f"{SESSION_COOKIE}={forged}"}).status_code == 401
        assert client.post("/account/logout", headers={"X-CSRF-Token": csrf(client)}, follow_redirects=False).status_code == 303
        assert client.get("/api/v1/me").status_code == 401
        with TestClient(app) as other:  # the old cookie, replayed: signed, but its session has ended
            assert other.get("/api/v1/me", headers={"Cookie": f"{SESSION_COOKIE}={good}"}).status_code == 401
        assert sign_in(client, next="//evil.example/").headers["location"] == "/"


def test_secure_cookie_over_https_and_secret_key_file(url, tmp_path):
    add_user(url)
    app = make_app(url, auth=True)
    with TestClient(app, base_url="https://testserver") as client:
        r = sign_in(client)
        assert all("Secure" in c for c in r.headers.get_list("set-cookie"))
    key_file = tmp_path / "home" / "secret_key"
    assert key_file.exists() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert secret_key() == key_file.read_text().strip() and len(secret_key()) >= 32


def test_secure_cookie_behind_a_tls_proxy(tmp_path):
    """uvicorn takes X-Forwarded-Proto from a trusted proxy (127.0.0.1 by default, $FORWARDED_ALLOW_IPS):
    behind one that terminates TLS the session cookie is Secure; straight over HTTP it is not."""
    import httpx
    from conftest import LiveServer

    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(db.make_engine(url))
    server = LiveServer(make_app(url, auth=True))
    try:
        behind = httpx.get(f"{server.url}/account/nav", headers={"X-Forwarded-Proto": "https"}).headers.get_list("set-cookie")
        direct = httpx.get(f"{server.url}/account/nav").headers.get_list("set-cookie")
    finally:
        server.stop()
    assert len(behind) == 2 and all("Secure" in c for c in behind)
    assert len(direct) == 2 and not any("Secure" in c for c in direct)


def test_login_lockout_after_repeated_failures(url):
    add_user(url)
    app = make_app(url, auth=True, login_failures=3, lockout_minutes=10)
    with TestClient(app) as client:
        for _ in range(2):
            assert refused(sign_in(client, password="wrong password!"))
        r = sign_in(client, password="wrong password!")
        assert refused(r) and "locked" in r.text
        r = sign_in(client)  # the right password, now refused
        assert r.status_code == 429 and "locked" in r.text and 500 < int(r.headers["retry-after"]) <= 600
        assert client.get("/api/v1/me").status_code == 401
    with store.transaction(db.make_engine(url)) as conn:  # an admin's new password unlocks it
        store.set_password(conn, "ada", "another good password")
    with TestClient(app) as client:
        assert sign_in(client, password="another good password").status_code == 303


def test_login_attempts_are_limited_per_address(url):
    app = make_app(url, auth=True, login_per_minute=3)
    with TestClient(app) as client:
        for _ in range(3):
            assert refused(sign_in(client, "nobody"))
        r = sign_in(client, "nobody")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60


def test_api_key_works_and_a_revoked_key_stops_at_once(url):
    add_user(url)
    key, key_id = add_key(url)
    app = make_app(url, auth=True)
    with TestClient(app) as client:
        bearer = {"Authorization": f"Bearer {key}"}
        assert client.get("/api/v1/me", headers=bearer).json() == {"username": "ada", "role": "viewer", "via": "key", "key_id": key_id}
        # a request with a key needs no CSRF token: it carries no ambient credential
        made = client.post("/api/v1/keys", json={"name": "second"}, headers=bearer)
        assert made.status_code == 201 and made.json()["key"].startswith("ssk_")
        second = {"Authorization": f"Bearer {made.json()['key']}"}
        assert client.get("/api/v1/me", headers=second).status_code == 200
        assert client.delete(f"/api/v1/keys/{made.json()['id']}", headers=bearer).status_code == 204
        assert client.get("/api/v1/me", headers=second).status_code == 401  # the very next request
        # revoked from another process (the CLI) between two requests: refused at once, nothing cached
        assert client.get("/api/v1/keys", headers=bearer).status_code == 200
        with store.transaction(db.make_engine(url)) as conn:
            assert store.revoke_key(conn, key_id)
        r = client.get("/api/v1/keys", headers=bearer)
        assert r.status_code == 401 and "invalid_token" in r.headers["www-authenticate"]
        assert client.get("/api/v1/me", headers={"Authorization": "Bearer ssk_notakeyatallnotakeyatall"}).status_code == 401
    with db.make_engine(url).connect() as conn:
        stored = {r.prefix: r for r in store.list_keys(conn)}
        assert key not in str(conn.exec_driver_sql("SELECT * FROM api_keys").all())  # only digests are stored
    assert key[:10] in stored and stored[key[:10]].last_used_at is not None


def test_roles_and_ended_sessions(url):
    add_user(url, "ada", "viewer")
    add_user(url, "root", "admin")
    app = make_app(url, auth=True)
    with TestClient(app) as viewer, TestClient(app) as admin:
        assert sign_in(viewer).status_code == 303 and sign_in(admin, "root").status_code == 303
        assert viewer.get("/admin/users").status_code == 403
        assert viewer.get("/api/v1/usage").status_code == 403
        page = admin.get("/admin/users")
        assert page.status_code == 200 and "ada" in page.text
        # the admin makes ada an editor: her session ends (she signs in again with the new role)
        r = admin.post("/admin/users/ada", data={"role": "editor", "csrf_token": csrf(admin)}, follow_redirects=False)
        assert r.status_code == 303
        assert viewer.get("/api/v1/me").status_code == 401
        assert sign_in(viewer).status_code == 303 and viewer.get("/api/v1/me").json()["role"] == "editor"
        # disabled: her session and her keys stop
        key, _ = add_key(url)
        assert admin.post("/admin/users/ada", data={"disabled": "1", "csrf_token": csrf(admin)}, follow_redirects=False).status_code == 303
        assert viewer.get("/api/v1/me").status_code == 401
        assert viewer.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        assert refused(sign_in(viewer))
        # an admin cannot lock themselves out
        assert admin.post("/admin/users/root", data={"disabled": "1", "csrf_token": csrf(admin)}).status_code == 422


def test_model_requests_per_key_get_429_with_retry_after(url):
    add_user(url)
    key, key_id = add_key(url)
    app = make_app(url, auth=True, live_per_minute=2)
    with TestClient(app) as client:
        bearer = {"Authorization": f"Bearer {key}"}
        assert client.post("/api/v1/steer", json=STEER).status_code == 401  # --anonymous read: the model needs an account
        for _ in range(2):
            assert client.post("/api/v1/steer", json=STEER, headers=bearer).status_code == 404
        r = client.post("/api/v1/saes/no-such-sae/activations", json={"text": "hi"}, headers=bearer)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60 and "2 model requests" in r.json()["detail"]
        # the HTML endpoints count too; htmx gets the refusal as the live pages' error card
        r = client.post("/saes/no-such-sae/inference/result", data={"text": "hi"}, headers={**bearer, "HX-Request": "true"})
        assert r.status_code == 200 and 'data-status="429"' in r.text
        # pages and the read API are not limited
        assert client.get("/api/v1/saes", headers=bearer).status_code == 200
        spec = client.get("/openapi.json").json()
        steer = spec["paths"]["/api/v1/steer"]["post"]
        assert {"401", "429"} <= set(steer["responses"]) and steer["security"] == [{"HTTPBearer": []}]
    with db.make_engine(url).connect() as conn:
        usage = {u.subject: u for u in store.usage(conn)}
    assert usage[f"key:{key_id}"].requests == 2 and usage[f"key:{key_id}"].refused == 2


def test_anonymous_model_use_is_limited_per_address_with_and_without_accounts(url):
    for app in (make_app(url, auth=True, anonymous="live", live_per_minute_address=1), make_app(url, live_per_minute_address=1)):
        with TestClient(app) as client:
            assert client.post("/api/v1/steer", json=STEER).status_code == 404
            r = client.post("/api/v1/steer", json=STEER)
            assert r.status_code == 429 and "your address" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        with db.make_engine(url).begin() as conn:  # the next app starts from a clean count
            conn.exec_driver_sql("DELETE FROM rate_windows")


def test_anonymous_none_keeps_everything_behind_sign_in(url):
    add_user(url)
    app = make_app(url, auth=True, anonymous="none")
    with TestClient(app) as client:
        r = client.get("/search?q=whale", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/account/login?next=%2Fsearch%3Fq%3Dwhale"
        assert client.get("/api/v1/saes").status_code == 401
        assert client.get("/api/v1/health").status_code == 200 and client.get("/static/style.css").status_code == 200
        assert sign_in(client, next="/").status_code == 303
        home = client.get("/")
        assert home.status_code == 200 and "public" not in home.headers.get("cache-control", "")


def test_signed_in_pages_stay_shared_and_cacheable(url):
    """Pages carry no per-user content (the nav is a fragment; the CSRF token is a cookie), so their
    ETags and the server's response cache serve everyone alike."""
    add_user(url)
    app = make_app(url, auth=True)
    with TestClient(app) as anonymous, TestClient(app) as signed_in:
        assert sign_in(signed_in).status_code == 303
        a, b = anonymous.get("/"), signed_in.get("/")
        assert a.text == b.text and a.headers["etag"] == b.headers["etag"] and "set-cookie" not in b.headers
        assert 'src="/static/accounts.js"' in a.text and 'hx-get="/account/nav"' in a.text
        assert "ada" in signed_in.get("/account/nav").text and "Sign in" in anonymous.get("/account/nav").text


def test_the_command_line_manages_users_keys_and_shows_usage(url):
    from typer.testing import CliRunner

    from saescope.cli import app as cli

    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, [*args, "--db", url], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    run("user", "add", "ada", "--role", "editor", "--password", PASSWORD)
    assert runner.invoke(cli, ["user", "add", "ada", "--password", PASSWORD, "--db", url]).exit_code != 0  # taken
    assert runner.invoke(cli, ["user", "add", "bob", "--password", "short", "--db", url]).exit_code != 0  # too short
    assert re.search(r"ada\s+editor\s+active", run("user", "list"))
    key = run("key", "add", "ada", "--name", "notebook").strip().splitlines()[-1]
    assert key.startswith("ssk_") and "notebook" in run("key", "list", "ada")
    app = make_app(url, auth=True, live_per_minute=1)
    with TestClient(app) as client:
        bearer = {"Authorization": f"Bearer {key}"}
        assert client.get("/api/v1/me", headers=bearer).json()["role"] == "editor"
        assert client.post("/api/v1/steer", json=STEER, headers=bearer).status_code == 404
        assert client.post("/api/v1/steer", json=STEER, headers=bearer).status_code == 429
        assert re.search(r"\s1\s+1 refused\s+live\s+key ssk_\S+ “notebook” of ada", run("usage", "--days", "1"))
        run("user", "role", "ada", "admin")
        assert client.get("/api/v1/me", headers=bearer).json()["role"] == "admin"
        key_id = re.search(r"^\s*(\d+)\s+ada", run("key", "list"), re.M)[1]
        run("key", "revoke", key_id)
        assert client.get("/api/v1/me", headers=bearer).status_code == 401
        assert "revoked" in run("key", "list")
        run("user", "disable", "ada")
        assert "disabled" in run("user", "list")
        run("user", "password", "ada", "--password", "another good password")
        run("user", "disable", "ada", "--enable")
        assert sign_in(client, password="another good password").status_code == 303


def test_serve_hands_the_auth_options_to_its_workers(tmp_path):
    """`saescope serve` passes AppConfig to each uvicorn worker as plain data: the auth options survive it."""
    auth = AuthConfig(auth=True, anonymous="none", live_per_minute=7, oidc_issuer="https://sso.example.org", oidc_client_id="atlas")
    config = AppConfig.resolve(f"sqlite:///{tmp_path / 's.db'}", auth=auth)
    assert AppConfig.from_dict(config.to_dict()) == config and AppConfig.from_dict(config.to_dict()).auth == auth
