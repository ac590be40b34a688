"""What accounts cost a page request (issue 31): the same feature page and API read served by one app with
accounts off, and by one with --auth to a visitor who is not signed in, to a signed-in session (one user
lookup per request) and to an API key (one key lookup per request, never cached). Rounds alternate the four
clients so that the machine's noise falls on all of them alike; the ratio to "off" is the figure to read.

    python bench/accounts_overhead.py --db sqlite:////tmp/acc-bench/saescope.db --sae smollm2-135m-L8-topk-8k

The store must be writable (a user and a key are added) and at the current schema (`saescope db upgrade`).
Requests go through the whole ASGI stack in-process (httpx's ASGITransport), without a socket."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from sqlalchemy import select

from app.accounts import store
from app.accounts.models import User
from app.config import AppConfig
from app.main import create_app
from sae_core.config import AuthConfig
from sae_core.store import db

PASSWORD = "bench password 123"


async def timed(client: httpx.AsyncClient, paths: list[str], headers: dict) -> list[float]:
    out = []
    for path in paths:
        t = time.perf_counter()
        r = await client.get(path, headers=headers)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--db", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--requests", type=int, default=200, help="per client and round")
    ap.add_argument("--cache-mb", type=int, default=64, help="the response cache (0: every page rendered)")
    args = ap.parse_args()

    engine = db.make_engine(args.db)
    with store.transaction(engine) as conn:
        if conn.execute(select(User.id).where(User.username == "bench")).first() is None:
            store.add_user(conn, "bench", PASSWORD, "viewer")
        key, _ = store.add_key_for(conn, "bench", "bench")
    off = create_app(config=AppConfig.resolve(args.db, response_cache_mb=args.cache_mb))
    on = create_app(config=AppConfig.resolve(args.db, response_cache_mb=args.cache_mb, auth=AuthConfig(auth=True)))
    base = "http://bench"
    clients = {
        "off": httpx.AsyncClient(transport=httpx.ASGITransport(app=off), base_url=base),
        "auth, not signed in": httpx.AsyncClient(transport=httpx.ASGITransport(app=on), base_url=base),
        "auth, session": httpx.AsyncClient(transport=httpx.ASGITransport(app=on), base_url=base),
        "auth, API key": httpx.AsyncClient(transport=httpx.ASGITransport(app=on), base_url=base),
    }
    session = clients["auth, session"]
    token = (await session.get("/account/nav")).cookies["saescope_csrf"]
    session.cookies.set("saescope_csrf", token)
    r = await session.post("/account/login", data={"username": "bench", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 303, r.text[:300]
    headers = {name: {} for name in clients}
    headers["auth, API key"] = {"Authorization": f"Bearer {key}"}
    # the feature pages of 20 features and the API's feature reads: after the first round, answers from the response cache
    paths = [p for i in range(20) for p in (f"/saes/{args.sae}/features/{i}", f"/api/v1/saes/{args.sae}/features/{i}")]
    paths = (paths * (args.requests // len(paths) + 1))[: args.requests]
    for name, client in clients.items():  # warm-up: templates, connections, the response cache
        await timed(client, paths, headers[name])
    medians: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(args.rounds):
        for name, client in clients.items():
            medians[name].append(statistics.median(await timed(client, paths, headers[name])))
    ref = statistics.median(medians["off"])
    cache = f"response cache {args.cache_mb} MB" if args.cache_mb else "no response cache"
    print(f"{len(paths)} requests per client and round, {args.rounds} rounds, {cache}; median of the rounds' medians")
    print(f"{'client':22} {'ms/request':>10} {'vs off':>8}")
    for name, values in medians.items():
        m = statistics.median(values)
        print(f"{name:22} {m * 1000:10.3f} {m / ref:8.2f}x")
    for client in clients.values():
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
