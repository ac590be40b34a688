"""Latency and throughput of the feature browser under concurrent clients, on SQLite and PostgreSQL.

    python bench/serve_latency.py [--store demo|thin] [--clients 32] [--seconds 10] [--client wrk|aiohttp]

--store demo (the default) serves what users build: the store `saescope demo` leaves in the data
directory ($SAESCOPE_HOME; run `saescope demo --no-serve` first), an 8,192-latent TopK SAE mined
over 200k tokens, so that features carry their full example sets (32 top contexts and 10 x 5
interval samples of 64 tokens; the page paints 10 top contexts and loads the rest on demand). The
same SAE is mined again into a PostgreSQL schema from the demo's activation cache. --store thin is
the earlier store: a freshly initialised 16,384-latent SAE mined over --tokens 32k tokens (serving
cost depends on the rows, not on training). The server is `saescope serve --no-live` in a subprocess
(its default: one worker process per core; --workers to pick).
The clients run on the same machine and compete with the server for its CPU. By default they are
wrk's (Debian's `wrk` package: a C load generator, one thread, --seconds per endpoint), which
costs a small fraction of what Python clients do; `--client aiohttp` runs --requests requests
from aiohttp coroutines in this process instead (earlier sessions' figures). Each endpoint at
--clients concurrency, on random features among those that fired (a dead feature's page has no
contexts and is cheaper):
  trivial    GET /api/v1/health                         (no database work: the server's ceiling)
  page       GET /saes/{sae}/features/{i}               (the full feature page)
  examples   GET /api/v1/saes/{sae}/features/{i}/examples?limit=20
each cold (every request a different URL, so each one renders) and warm (a working set of 256
features, already in the response cache), warm again with Accept-Encoding: gzip, and as conditional
requests (If-None-Match with each path's current ETag, answered 304 Not Modified: what a browser or
proxy revalidating a shared link costs). It also prints the mean response size, plain and gzip.
The trivial endpoint is measured first and again after every two endpoints; each ratio divides by
the faster of the trivial runs just before and after it (the shared machine's speed drifts).
Goals (issue 21): warm page >= 0.5x trivial req/s, cold >= 0.1x, warm p99 < 100 ms at 32 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_SCHEMA = "saescope_bench"
SAE_NAME = "bench-16k"


def build_stores(tokens: int, n_latents: int) -> tuple[dict[str, str], str]:
    """The thin store: one random 16k SAE mined into a SQLite file and a PostgreSQL schema (kept in
    bench/out between runs). Returns the URLs and the SAE's name."""
    import torch

    from sae_core.interchange import save_sae
    from sae_core.mine import MineConfig, mine
    from sae_core.sae import TopKConfig, TopKSAE

    OUT.mkdir(parents=True, exist_ok=True)
    urls = {"sqlite": f"sqlite:///{OUT / 'serve-bench.db'}", "postgresql": pg_schema_url(PG_SCHEMA)}
    sae_dir = OUT / SAE_NAME
    if not (sae_dir / "cfg.json").exists():
        torch.manual_seed(0)
        sae = TopKSAE(TopKConfig(d_in=576, n_latents=n_latents, k=32))
        save_sae(sae, sae_dir, metadata={"cache": {"model": "smollm2-135m", "hook": "blocks.8.hook_resid_post", "corpus": "demo",
                                                   "context_size": 128, "skip_positions": 1, "seed": 0}})
    for backend, url in urls.items():   # mine() skips a store that already holds this run
        result = mine(sae_dir, MineConfig(tokens=tokens, name=SAE_NAME, db=url), progress=True)
        print(f"{backend}: {'already mined' if result.skipped else f'mined {result.positions:,} positions'}")
    return urls, SAE_NAME


def pg_schema_url(schema: str) -> str:
    from sqlalchemy import create_engine, text

    with create_engine(PG_ADMIN).begin() as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    return f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


def demo_stores() -> tuple[dict[str, str], str]:
    """The demo's own store (read as it is) and the same SAE mined and explained into PostgreSQL with
    the demo's settings, from its activation cache."""
    from sae_core import settings
    from sae_core.config import DemoConfig, ExplainConfig
    from sae_core.explain.stage import explain
    from sae_core.feature_stats import StatsConfig
    from sae_core.mine import MineConfig, mine
    from sae_core.store import db

    cfg = DemoConfig()
    sae_dir = settings.runs_dir() / "demo" / cfg.name  # where `saescope demo` trains it
    if not (sae_dir / "cfg.json").exists():
        sys.exit(f"no demo SAE at {sae_dir}: run `saescope demo --no-serve` first (or pass --store thin)")
    urls = {"sqlite": db.database_url(None), "postgresql": pg_schema_url(PG_SCHEMA + "_demo")}
    result = mine(sae_dir, MineConfig(tokens=cfg.mine_tokens, name=cfg.name, db=urls["postgresql"], stats=StatsConfig()), progress=True)
    print(f"postgresql: {'already mined' if result.skipped else f'mined {result.positions:,} positions'}")
    explained = explain(cfg.name, ExplainConfig(db=urls["postgresql"]))  # as the demo's sixth stage: the same pages on both
    print(f"postgresql: explained {explained.explained:,} features")
    return urls, cfg.name


def alive_features(url: str, sae: str) -> list[int]:
    from sqlalchemy import text

    from sae_core.store import db

    with db.make_engine(url).connect() as conn:
        return list(conn.execute(text("SELECT f.feature_index FROM features f JOIN saes s ON f.run_id = s.active_run_id "
                                      "WHERE s.name = :n AND f.n_fired > 0 ORDER BY 1"), {"n": sae}).scalars())


def page_shape(url: str, sae: str) -> str:
    """How many examples a feature of the store holds, on average."""
    from sqlalchemy import text

    from sae_core.store import db

    with db.make_engine(url).connect() as conn:
        rows = dict(conn.execute(text("SELECT e.kind, count(*) FROM examples e JOIN saes s ON e.run_id = s.active_run_id "
                                      "WHERE s.name = :n GROUP BY e.kind"), {"n": sae}).all())
        n = conn.execute(text("SELECT n_latents FROM saes WHERE name = :n"), {"n": sae}).scalar()
    return f"{rows.get('top', 0) / n:.1f} top contexts and {rows.get('interval', 0) / n:.1f} interval samples per feature"


class Load(NamedTuple):
    p50_ms: float
    p99_ms: float
    rate: float         # requests per second
    requests: int


def wrk(base: str, paths: list[str], clients: int, seconds: float, etags: dict[str, str] | None = None, gzip: bool = False) -> Load:
    """`clients` keep-alive connections from wrk, each sending its next request (the next of `paths`,
    cycling) as soon as the last answers, for `seconds`; any 4xx/5xx answer is an error. With `etags`,
    each request carries If-None-Match with its path's ETag; with `gzip`, Accept-Encoding: gzip."""
    script = OUT / "wrk-paths.lua"
    tags = [etags[p] if etags else "" for p in paths]
    script.write_text(('wrk.headers["Accept-Encoding"] = "gzip"\n' if gzip else "") + "paths = {" + ",".join(f'"{p}"' for p in paths) + "}\n"
                      "tags = {" + ",".join("'" + t + "'" for t in tags) + "}\ni = 0\n"
                      "request = function()\n  i = i % #paths + 1\n"
                      "  if tags[i] ~= '' then return wrk.format(\"GET\", paths[i], {[\"If-None-Match\"] = tags[i]}) end\n"
                      "  return wrk.format(\"GET\", paths[i])\nend\n")
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", str(script), base],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    pct = {int(p): float(v) * unit[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    if 99 not in pct:
        raise RuntimeError(f"cannot read wrk's latency distribution:\n{out}")
    return Load(pct[50], pct[99], float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), int(re.search(r"(\d+) requests in", out)[1]))


async def hammer(base: str, paths: list[str], clients: int, etags: dict[str, str] | None = None) -> Load:
    """`clients` aiohttp keep-alive connections, each sending its next request as soon as the last
    answers, until `paths` are all requested (with If-None-Match from `etags` when given)."""
    import aiohttp

    latencies: list[float] = []
    queue = list(paths)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker():
            while queue:
                path = queue.pop()
                t0 = time.perf_counter()
                async with client.get(path, headers={"If-None-Match": etags[path]} if etags else None) as r:
                    await r.read()
                    status = r.status
                latencies.append(time.perf_counter() - t0)
                if status not in (200, 304):
                    raise RuntimeError(f"{path}: HTTP {status}")
        gc.collect()
        gc.freeze()     # the clients' own full collections would stall all 32 of them and count as latency
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        gc.unfreeze()
    q = statistics.quantiles(latencies, n=100)
    return Load(q[49] * 1000, q[98] * 1000, len(latencies) / wall, len(latencies))


WORKING_SET = 256       # distinct pages of the warm runs (they fit the default 64 MB response cache)
COLD_PATHS = 40_000     # distinct URLs of the cold runs: more than a run requests
WARM_UP = 2000          # distinct pages rendered before measuring (see main)
TRIVIAL = "trivial /api/v1/health"


def len_plain(base: str, paths: list[str]) -> list[int]:
    """Uncompressed body sizes."""
    with httpx.Client(base_url=base, timeout=30, headers={"Accept-Encoding": "identity"}) as client:
        return [len(client.get(p).content) for p in paths]


def current_etags(base: str, paths: set[str]) -> dict[str, str]:
    """Each path's ETag as the server sends it now (what a revalidating client holds)."""
    with httpx.Client(base_url=base, timeout=30) as client:
        return {p: client.get(p).headers["etag"] for p in sorted(paths)}


def serve(url: str, workers: int | None, loop: str | None = None) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-c", "from saescope.cli import main; main()", "serve", "--db", url, "--port", str(port), "--no-live",
                             *(["--workers", str(workers)] if workers else []), *(["--loop", loop] if loop else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/api/v1/health", timeout=1).status_code == 200 and listening(proc, port) >= (workers or min(os.cpu_count(), 8)):
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


def listening(proc: subprocess.Popen, port: int) -> int:
    """Server processes listening on `port`. One worker answering is not enough: connections made
    before the others listen all land on it (each worker has its own SO_REUSEPORT socket on Linux)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    return sum(any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")) for p in procs)


def server_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds used so far by the server and its worker processes."""
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--client", choices=["wrk", "aiohttp"], default="wrk", help="load generator (wrk: `apt-get install wrk`)")
    ap.add_argument("--seconds", type=float, default=10, help="wrk: seconds per endpoint")
    ap.add_argument("--requests", type=int, default=2000, help="aiohttp: requests per endpoint; wrk: distinct random paths it cycles through")
    ap.add_argument("--store", choices=["demo", "thin"], default="demo", help="demo: the demo's own store (representative); thin: a random 16k SAE over --tokens")
    ap.add_argument("--tokens", type=int, default=32768, help="thin: tokens mined into the store")
    ap.add_argument("--n-latents", type=int, default=16384, help="thin: SAE width")
    ap.add_argument("--workers", type=int, default=None, help="server processes (default: saescope serve's, one per core)")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default=None, help="server event loop (default: saescope serve's)")
    args = ap.parse_args()
    urls, SAE = demo_stores() if args.store == "demo" else build_stores(args.tokens, args.n_latents)
    rng = random.Random(0)
    alive = alive_features(urls["sqlite"], SAE)
    if args.client == "wrk" and not shutil.which("wrk"):
        sys.exit("wrk is not installed: `apt-get install wrk`, or pass --client aiohttp")
    how = f"{args.seconds:g} s per endpoint from wrk" if args.client == "wrk" else f"{args.requests} requests per endpoint from aiohttp"
    print(f"\n{args.clients} concurrent clients, {how}, random features among the {len(alive):,} "
          f"in the {args.store} store ({page_shape(urls['sqlite'], SAE)}), "
          f"{args.workers or 'default (one per core)'} server process(es), {args.loop or 'default'} event loop, {os.cpu_count()} cores\n")
    print("| store | endpoint | p50 ms | p99 ms | req/s | server CPU ms/req |\n|---|---|---|---|---|---|")
    for backend, url in urls.items():
        proc, base = serve(url, args.workers, args.loop)
        try:
            # cold: every request a different URL (a unique query suffix), so each one renders;
            # warm: a working set of WORKING_SET features, each requested once before the run
            page = [f"/saes/{SAE}/features/{rng.choice(alive)}" for _ in range(WORKING_SET)]
            examples = [f"/api/v1/saes/{SAE}/features/{rng.choice(alive)}/examples?limit=20" for _ in range(WORKING_SET)]
            cold = max(args.requests, COLD_PATHS)
            endpoints = {
                TRIVIAL: ["/api/v1/health"] * args.requests,
                "feature page (cold)": [f"/saes/{SAE}/features/{rng.choice(alive)}?cold={i}" for i in range(cold)],
                "examples API (cold)": [f"/api/v1/saes/{SAE}/features/{rng.choice(alive)}/examples?limit=20&cold={i}"
                                        for i in range(cold)],
                "feature page (warm)": page, "examples API (warm)": examples,
            }
            # warm-up, as a server that has been up a while: the vocabulary and the per-token renderings
            # (app/render.py) cached in each worker, connections open; distinct pages, none measured later
            asyncio.run(hammer(base, [f"/saes/{SAE}/features/{rng.choice(alive)}?warm={i}" for i in range(WARM_UP)], 8))
            etags = current_etags(base, set(page) | set(examples))          # also fills the response cache
            with httpx.Client(base_url=base, timeout=30, headers={"Accept-Encoding": "gzip"}) as client:
                gz_sizes = {p: int(client.get(p).headers["content-length"]) for p in page + examples}   # and its gzip variants
            print(f"| {backend} | response bytes: feature page {statistics.mean(len_plain(base, page)):,.0f} "
                  f"-> gzip {statistics.mean(gz_sizes[p] for p in page):,.0f}; examples {statistics.mean(len_plain(base, examples)):,.0f} "
                  f"-> gzip {statistics.mean(gz_sizes[p] for p in examples):,.0f} | | | | |")
            # The machine's speed drifts (a shared VM: the trivial endpoint's rate moved by a third within
            # one run), so the trivial endpoint is measured again after every two runs, and each run is
            # divided by the faster of the trivial runs just before and after it: never flattered by a
            # slow spell of the baseline.
            measured = [(name, paths, None, False) for name, paths in endpoints.items() if name != TRIVIAL]
            measured += [("feature page (warm, gzip)", page, None, True), ("examples API (warm, gzip)", examples, None, True)]
            measured += [("feature page (304)", page, etags, False), ("examples API (304)", examples, etags, False)]
            trivial_run = (TRIVIAL, endpoints[TRIVIAL], None, False)
            runs = [trivial_run]
            for i in range(0, len(measured), 2):
                runs += [*measured[i : i + 2], trivial_run]
            rates: list[tuple[str, float]] = []
            for name, paths, tags, gz in runs:
                cpu0 = server_cpu(proc)
                load = (wrk(base, paths, args.clients, args.seconds, tags, gz) if args.client == "wrk"
                        else asyncio.run(hammer(base, paths, args.clients, tags)))
                cpu = (server_cpu(proc) - cpu0) / load.requests
                rates.append((name, load.rate))
                print(f"| {backend} | {name} | {load.p50_ms:.1f} | {load.p99_ms:.1f} | {load.rate:,.0f} | {cpu * 1000:.2f} |", flush=True)
            for i, (name, rate) in enumerate(rates):
                if name != TRIVIAL:
                    before = next(r for n, r in reversed(rates[:i]) if n == TRIVIAL)
                    after = next(r for n, r in rates[i:] if n == TRIVIAL)
                    print(f"| {backend} | {name} / trivial req/s (the faster of {before:,.0f} and {after:,.0f}) | | | "
                          f"{rate / max(before, after):.2f} | |")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
