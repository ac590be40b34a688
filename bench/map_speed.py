"""How long `saescope map` takes, how much memory it holds, and how smoothly the map page pans and zooms.

    python bench/map_speed.py [--demo-store /work/home/saescope.db] [--sizes 16384,65536] [--page 65536] [--frames 240]

1. The demo's SAE (8,192 latents, when --demo-store has it): `saescope map` itself on a copy of the
   store, in a child process (wall time, stage times, peak resident memory).
2. Synthetic SAEs of --sizes latents, decoder rows shaped like the demo's: each row is one of the demo
   SAE's 8k decoder directions plus noise of the same norm (cosine ~0.7 to it), so the rows gather as a
   real dictionary's do, with the finer copies feature splitting makes; without the demo store, rows
   around 2,048 random directions. Each size in its own child process: the layout (kNN, UMAP, clusters,
   `compute_layout`) and the write into a store (`write_map`) of a synthetic run of that size built by
   bench/store_scale.py's writer, with an explanation per feature.
3. The page at --page points: the synthetic store served in process (uvicorn), chromium opens
   /saes/{sae}/map, then a script pans in a circle for half the frames (the points stay in view) and
   zooms in and out about the centre for the other half, one step per animation frame; it reports
   the frame intervals (what a reader sees: p50, p95, max) and the draw's own time per frame.

Goals (issue 27, on a 2-core machine): 16k in under 60 s, 65k in under 5 minutes, p95 frame under 33 ms.
Stores and layouts go to bench/out (kept: a re-run re-measures but reuses the synthetic stores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "out"
DEMO_SAE = "smollm2-135m-L8-topk-8k"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def copy_sqlite(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return f"sqlite:///{dst}"


def demo_directions(demo_store: Path | None) -> np.ndarray | None:
    """The demo SAE's decoder rows [8192, 576], or None without the demo store."""
    if demo_store is None or not demo_store.exists():
        return None
    from sqlalchemy import create_engine

    from sae_core.store.weights import load_run_sae

    engine = create_engine(f"sqlite:///file:{demo_store}?mode=ro&uri=true")
    with engine.connect() as conn:
        _, loaded = load_run_sae(conn, DEMO_SAE)
    engine.dispose()
    return loaded.sae.W_dec.detach().float().numpy()


def synthetic_rows(n: int, directions: np.ndarray | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if directions is None:
        directions = rng.standard_normal((2048, 576)).astype(np.float32)
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    d = directions.shape[1]
    rows = directions[rng.integers(0, len(directions), n)] + rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# --- children: one measurement each, so that the peak memory is that measurement's -----------------------


def child_demo(store: str) -> dict:
    env = {**os.environ, "SAESCOPE_HOME": str(OUT / "map-home")}
    t0 = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", "%M", str(Path(sys.executable).parent / "saescope"), "map", "--sae", DEMO_SAE, "--db", store, "--force"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"saescope map failed:\n{r.stderr[-2000:]}")
    line = [x for x in r.stderr.splitlines() if x.startswith("mapped ")][-1]
    return {
        "what": f"demo SAE via `saescope map` ({line})",
        "seconds": seconds,
        "peak_rss_mb": int(r.stderr.strip().splitlines()[-1]) / 1024,
    }


def synthetic_store(n: int) -> str:
    """bench/out/map-synthetic-{n}.db: a synthetic mined run of n features (store_scale's writer) with an
    explanation per fired feature; built once."""
    import store_scale

    from sae_core.store import db
    from sae_core.store.write import find_complete_run, write_run

    url = f"sqlite:///{OUT / f'map-synthetic-{n}.db'}"
    engine = db.open_store(url, upgrade_schema=True)
    run = store_scale.synthetic_run(n, top=2, intervals=1, context=16)
    if find_complete_run(engine, run.sae.name, run.config) is None:
        write_run(engine, run, progress=False)
    store_scale.explain_synthetic(engine, run.sae.name, run.tables.n_fired)
    engine.dispose()
    return url


def child_synthetic(n: int, demo_store: Path | None) -> dict:
    from sqlalchemy import select

    from sae_core.config import MapConfig
    from sae_core.relations.map import _settings, compute_layout, write_map
    from sae_core.store import db
    from sae_core.store.schema import SAE, Feature

    url = synthetic_store(n)
    engine = db.open_store(url)
    with engine.connect() as conn:
        sae_id, run_id = conn.execute(select(SAE.id, SAE.active_run_id).where(SAE.name == f"synthetic-{n}")).one()
        alive = list(conn.scalars(select(Feature.index).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)))
    rows = synthetic_rows(n, demo_directions(demo_store))[alive]
    base_rss = peak_rss_mb()
    cfg = MapConfig(db=url)
    cpu0 = time.process_time()  # CPU seconds of all threads: on a busy machine, a better guide than the wall clock
    t0 = time.perf_counter()
    layout = compute_layout(rows, cfg)
    t1 = time.perf_counter()
    write_map(engine, sae_id, run_id, alive, layout, cfg, _settings(cfg, len(alive)), t1 - t0)
    t2 = time.perf_counter()
    engine.dispose()
    n_clusters = int(layout.clusters.max()) + 1
    return {
        "what": f"synthetic {n:,} latents, {len(alive):,} alive, {n_clusters} clusters",
        "seconds": t2 - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "stages": {**{k: round(v, 1) for k, v in layout.timings.items()}, "write": round(t2 - t1, 1)},
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base_rss,
    }


FRAMES_JS = """async (frames) => {
  const m = window.saescopeMap, canvas = document.getElementById('map-canvas');
  const w = canvas.clientWidth, h = canvas.clientHeight;
  const intervals = [], draws = [];
  let last = null;
  await new Promise((done) => {
    let k = 0;
    const step = (now) => {
      if (last !== null) { intervals.push(now - last); draws.push(m.lastDrawMs); }
      last = now;
      if (k === frames) { done(); return; }
      // a circle of ~80 px (the points stay in view), then in and out about the centre
      if (k < frames / 2) m.panBy(8 * Math.cos(k * Math.PI / 30), 8 * Math.sin(k * Math.PI / 30));
      else m.zoomAt(k < frames * 3 / 4 ? 1.04 : 1 / 1.04, w / 2, h / 2);
      k++;
      requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
  });
  return {intervals, draws, n: m.n, width: w, height: h};
}"""


def page_frames(n: int, frames: int) -> dict:
    import shutil as sh

    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import LiveServer

    from app.main import create_app

    url = synthetic_store(n)
    live = LiveServer(create_app(url))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=sh.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            t0 = time.perf_counter()
            page.goto(f"{live.url}/saes/synthetic-{n}/map")
            # polled with evaluate: wait_for_function polls through eval, which the page's CSP refuses
            while not page.evaluate("!!(window.saescopeMap && window.saescopeMap.ready)"):
                page.wait_for_timeout(20)
            ready = time.perf_counter() - t0
            while not page.evaluate("window.saescopeMap.labelsReady"):
                page.wait_for_timeout(20)
            labels = time.perf_counter() - t0
            result = page.evaluate(FRAMES_JS, frames)
            page.screenshot(path=str(OUT / f"map-page-{n}.png"))
            browser.close()
    finally:
        live.stop()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")
    iv, dr = sorted(result["intervals"]), sorted(result["draws"])
    q = lambda v, f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
    return {
        "what": f"map page, {result['n']:,} points, canvas {result['width']}x{result['height']} CSS px, {len(iv)} frames (pan, then zoom)",
        "first_draw_s": round(ready, 2),
        "labels_s": round(labels, 2),
        "frame_ms": {"p50": round(statistics.median(iv), 1), "p95": round(q(iv, 0.95), 1), "max": round(iv[-1], 1)},
        "draw_ms": {"p50": round(statistics.median(dr), 1), "p95": round(q(dr, 0.95), 1), "max": round(dr[-1], 1)},
    }


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-store", type=Path, default=Path("/work/home/saescope.db"), help="the demo's SQLite store (read only)")
    ap.add_argument("--sizes", default="16384,65536", help="synthetic SAE widths to map")
    ap.add_argument("--page", type=int, default=65536, help="points on the page whose frames are timed (one of --sizes); 0 skips it")
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    demo = args.demo_store if args.demo_store.exists() else None
    if args.child:
        kind, value = args.child[0], args.child[1]
        out = (
            child_demo(value)
            if kind == "demo"
            else child_synthetic(int(value), demo)
            if kind == "synthetic"
            else page_frames(int(value), args.frames)
        )
        print(json.dumps(out))
        return

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start (shared machine: timings are noisy)")
    results = []
    if demo is not None:
        shutil.rmtree(OUT / "map-home", ignore_errors=True)
        results.append(run_child("demo", copy_sqlite(demo, OUT / "map-demo.db")))
        print(json.dumps(results[-1]), flush=True)
    else:
        print(f"no demo store at {args.demo_store}: synthetic rows around random directions")
    for n in [int(s) for s in args.sizes.split(",") if s]:
        results.append(run_child("synthetic", str(n)))
        print(json.dumps(results[-1]), flush=True)
    if args.page:
        results.append(run_child("page", str(args.page), "--frames", str(args.frames)))
        print(json.dumps(results[-1]), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
