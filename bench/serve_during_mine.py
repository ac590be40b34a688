"""Readers while `saescope mine` writes a new run of the same SAE into the store they read.

    python bench/serve_during_mine.py [--backends sqlite,postgresql] [--clients 8]

Serves a copy of the demo's store (SQLite: a backup of it in bench/out; PostgreSQL: the schema
serve_latency.py mines the demo SAE into), then runs `saescope mine --force` of the demo SAE into
that same store while --clients clients request random feature pages and the SAE's API summary
without pause. It reports, before and during the write: requests, errors (any status but 200),
p50/p99; and whether the switch was visible at once: the run id the API reports, from the first
request sent after `saescope mine` exited (it must be the new run; `stale after exit` counts the
answers that still named the old one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "out"


async def readers(base: str, sae: str, alive: list[int], clients: int, stop: asyncio.Event, log: list) -> None:
    """Each client: a feature page, then the SAE summary, again and again; log (t_sent, latency, status, run_id)."""
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def one() -> None:
            while not stop.is_set():
                for path in (f"/saes/{sae}/features/{rng.choice(alive)}", f"/api/v1/saes/{sae}"):
                    t0 = time.perf_counter()
                    try:
                        r = await client.get(path)
                        status, run = r.status_code, (r.json()["mining"]["run_id"] if path.startswith("/api") and r.status_code == 200 else None)
                    except httpx.HTTPError as exc:
                        status, run = type(exc).__name__, None
                    log.append((t0, time.perf_counter() - t0, status, run))

        await asyncio.gather(*(one() for _ in range(clients)))


def summary(rows: list) -> str:
    lat = [r[1] * 1000 for r in rows]
    errors = sum(r[2] != 200 for r in rows)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0] * 99
    return f"{len(rows):,} requests, {errors} errors, p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms"


from sae_core.config import DemoConfig  # noqa: E402


async def run(backend: str, url: str, sae: str, sae_dir: Path, clients: int, before_s: float) -> None:
    from serve_latency import alive_features, serve

    alive = alive_features(url, sae)
    proc, base = serve(url, workers=None)
    log: list = []
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(readers(base, sae, alive, clients, stop, log))
        await asyncio.sleep(before_s)
        old_run = next(r[3] for r in reversed(log) if r[3] is not None)
        t_start = time.perf_counter()
        mine = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from saescope.cli import main; main()", "mine", "--sae", str(sae_dir), "--db", url, "--force",
            "--name", sae, "--tokens", str(DemoConfig().mine_tokens), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await mine.communicate()
        t_exit = time.perf_counter()
        if mine.returncode:
            raise RuntimeError(f"mine failed: {err.decode()[-2000:]}")
        await asyncio.sleep(3)
        stop.set()
        await task
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    before = [r for r in log if r[0] < t_start]
    during = [r for r in log if t_start <= r[0] < t_exit]
    after = [r for r in log if r[0] >= t_exit and r[3] is not None]
    stale = sum(r[3] == old_run for r in after)
    new_runs = {r[3] for r in after}
    print(f"| {backend} | before the write | {summary(before)} |")
    print(f"| {backend} | during `saescope mine` ({t_exit - t_start:.0f} s) | {summary(during)} |")
    print(f"| {backend} | after it exited | run {old_run} -> {sorted(new_runs)}, stale after exit: {stale} of {len(after)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--before", type=float, default=10, help="seconds of reading before the write starts")
    args = ap.parse_args()
    from serve_latency import demo_stores

    from sae_core import settings

    urls, sae = demo_stores()
    sae_dir = settings.runs_dir() / "demo" / sae
    OUT.mkdir(parents=True, exist_ok=True)
    copy = OUT / "during-mine.db"  # never write into the demo's own store
    src, dst = sqlite3.connect(urls["sqlite"].removeprefix("sqlite:///")), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    urls["sqlite"] = f"sqlite:///{copy}"
    print(f"\n{args.clients} clients reading, {os.cpu_count()} cores\n\n| store | phase | readers |\n|---|---|---|")
    for backend in args.backends.split(","):
        asyncio.run(run(backend, urls[backend], sae, sae_dir, args.clients, args.before))


if __name__ == "__main__":
    main()
