"""Live features under load, all three measurements in one run (bench/RESULTS.md, "Live"):

  (a) POST /api/v1/saes/{sae}/activations on a 64- and a 512-token text, p50 / p99 at 1 and 8 concurrent
      clients, beside the bare in-process cost of the same text (tokenize, forward to the hook, encode).
      Goal: at 1 client the endpoint within 1.25x of the bare cost.
  (b) steered generation of 64 new tokens (runtime with a real intervention) against plain `generate` with
      no hook, same prompt and settings. Goal: >= 0.9x its tokens/s.
  (c) the feature page's p99 while 2 clients steer continuously, against its idle p99. Goal: under 2x.

The server is a real `saescope serve` (1 worker, its model process with --live-threads 1, response cache
off so every page is rendered), over a store that holds a real SAE: --db/--sae, or by default the demo
SAE folder mined here into a temporary SQLite store.

    .venv/bin/python bench/live_latency.py [--db URL --sae NAME | --sae-dir DIR] [--requests 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sae_core.config import GenerationConfig, LiveConfig  # noqa: E402
from sae_core.live.interventions import Intervention, SteeringHook  # noqa: E402
from sae_core.live.runtime import LiveRuntime  # noqa: E402
from sae_core.store import db as store_db  # noqa: E402

WORDS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness. "
)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def text_of(tokenizer, n: int) -> str:
    ids = tokenizer((WORDS * (n // 20 + 2)), add_special_tokens=False)["input_ids"][:n]
    return tokenizer.decode(ids)


def timed_requests(make, clients: int, per_client: int) -> list[float]:
    times: list[float] = []
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=120) as c:
            for _ in range(per_client):
                t = time.perf_counter()
                r = make(c)
                dt = time.perf_counter() - t
                assert r.status_code == 200, r.text[:300]
                with lock:
                    times.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db")
    ap.add_argument("--sae")
    ap.add_argument("--sae-dir", default=os.path.expandvars("$SAESCOPE_HOME/runs/demo/smollm2-135m-L8-topk-8k"))
    ap.add_argument("--mine-tokens", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--live-nice", type=int, default=LiveConfig().live_nice, help="the server's --live-nice")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the server's model process (--live-threads 1)
    tmp = Path(tempfile.mkdtemp(prefix="live-bench-"))
    url, sae = args.db, args.sae
    lm = None
    if url is None:
        from sae_core.config import MineConfig, StatsConfig
        from sae_core.mine import mine
        from sae_core.model import load_model

        url = f"sqlite:///{tmp / 'store.db'}"
        lm = load_model()
        cfg = MineConfig(tokens=args.mine_tokens, stats=StatsConfig(top_n=8), db=url)
        sae = mine(args.sae_dir, cfg, lm=lm, progress=False).sae_name
    engine = store_db.open_store(url)
    runtime = LiveRuntime(LiveConfig(), engine=engine, lm=lm)
    held = runtime.sae(sae)
    lm = runtime.lm
    assert lm is not None and sae is not None
    load = os.getloadavg()[0]
    print(
        f"model {lm.name} ({lm.dtype}), SAE {sae}, torch threads 1, {os.cpu_count()} cores, "
        f"load average {load:.1f}, live nice {args.live_nice}"
    )

    env = {**os.environ, "SAESCOPE_DATABASE_URL": url}
    cmd = [
        sys.executable,
        "-c",
        "from saescope.cli import main; main()",
        "serve",
        "--port",
        str(args.port),
        "--workers",
        "1",
        "--live-threads",
        "1",
        "--response-cache-mb",
        "0",
        "--live-queue",
        "16",
        "--live-model-dtype",
        str(lm.dtype).split(".")[-1],
    ]
    server = subprocess.Popen(cmd, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{base}/api/v1/live").json().get("state") == "ready":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.time() < deadline, "the server's model did not become ready"
            time.sleep(0.5)

        print("\n(a) activations endpoint vs the bare in-process cost")
        for n in (64, 512):
            text = text_of(lm.tokenizer, n)

            def bare(text=text):
                t = time.perf_counter()
                with torch.inference_mode():
                    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
                    held.loaded.sae.encode(lm.residuals(torch.tensor([ids]), held.layer)[0].float())
                return time.perf_counter() - t

            bare()
            bare_times = [bare() for _ in range(args.requests)]
            post = lambda c: c.post(f"{base}/api/v1/saes/{sae}/activations", json={"text": text})  # noqa: B023
            with httpx.Client(timeout=120) as warm:
                post(warm)
            one = timed_requests(post, 1, args.requests)
            eight = timed_requests(post, 8, max(2, args.requests // 8))
            b50 = statistics.median(bare_times)
            print(
                f"  {n:4d} tokens: bare p50 {b50 * 1e3:7.1f} ms p99 {pct(bare_times, 0.99) * 1e3:7.1f} | "
                f"1 client p50 {statistics.median(one) * 1e3:7.1f} p99 {pct(one, 0.99) * 1e3:7.1f} | "
                f"8 clients p50 {statistics.median(eight) * 1e3:7.1f} p99 {pct(eight, 0.99) * 1e3:7.1f} ms | "
                f"1-client p50 / bare p50 = {statistics.median(one) / b50:.2f}x (goal <= 1.25x)"
            )

        print("\n(b) steered generate vs plain generate, 64 new tokens, greedy")
        prompt = "The ship sailed out of the harbour and"
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        settings = GenerationConfig(max_new_tokens=64)
        feature = int(held.loaded.sae.W_dec.shape[0] // 2)
        hook = SteeringHook(held.loaded.sae, [Intervention(feature, "clamp", 5.0)])
        rates = {"plain": [], "steered": []}
        for _ in range(3):
            for name, h in (("plain", None), ("steered", hook)):
                t = time.perf_counter()
                out = runtime.continue_(lm, ids, settings, h, held.layer)
                rates[name].append(len(out.token_ids) / (time.perf_counter() - t))
        plain, steered = statistics.median(rates["plain"]), statistics.median(rates["steered"])
        print(f"  plain {plain:.1f} tok/s, steered {steered:.1f} tok/s: {steered / plain:.2f}x (goal >= 0.9x)")

        print("\n(c) feature page p99, idle and while 2 clients steer continuously")
        n_latents = held.loaded.sae.cfg.n_latents
        counter = iter(range(10**9))
        page = lambda c: c.get(f"{base}/saes/{sae}/features/{(next(counter) * 7919) % n_latents}")  # noqa: E731
        timed_requests(page, 1, 10)
        idle = timed_requests(page, 1, args.requests * 3)
        stop = threading.Event()

        def steerer():
            with httpx.Client(timeout=300) as c:
                while not stop.is_set():
                    c.post(
                        f"{base}/api/v1/steer",
                        json={
                            "sae": sae,
                            "prompt": prompt,
                            "max_new_tokens": 32,
                            "interventions": [{"feature": feature, "mode": "clamp", "value": 5}],
                        },
                    )

        steerers = [threading.Thread(target=steerer) for _ in range(2)]
        for th in steerers:
            th.start()
        time.sleep(3)
        busy = timed_requests(page, 1, args.requests * 3)
        stop.set()
        for th in steerers:
            th.join()
        status = httpx.get(f"{base}/api/v1/live").json()
        print(
            f"  idle p50 {statistics.median(idle) * 1e3:.1f} ms p99 {pct(idle, 0.99) * 1e3:.1f} ms | while steering "
            f"p50 {statistics.median(busy) * 1e3:.1f} ms p99 {pct(busy, 0.99) * 1e3:.1f} ms: "
            f"{pct(busy, 0.99) / pct(idle, 0.99):.2f}x (goal < 2x); model requests completed in the run: {status['completed']}"
        )
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        server.terminate()
        server.wait(20)


if __name__ == "__main__":
    main()
