"""CPU per request of the store reads that issue 32 moved from the ORM Session to Core rows (the SAE
page and its feature table, the SAE list, the SAE's detail), in process, without the response cache.

    python bench/read_paths.py --db sqlite:///bench/out/serve-bench.db [--sae bench-16k] [--rounds 5]

Each path is requested `--n` times per round through Starlette's TestClient (every request renders:
the response cache is off and every URL is distinct where the endpoint allows); prints the median of
the rounds' per-request times, wall and CPU (the process's CPU time: the app runs in TestClient's thread in
this process, so a loaded machine moves it far less than the wall time). Run it in two trees (PYTHONPATH) on
the same store to compare commits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--sae", default="bench-16k")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=100, help="requests per path per round")
    args = ap.parse_args()
    os.environ["SAESCOPE_RESPONSE_CACHE_MB"] = "0"  # every request renders
    from fastapi.testclient import TestClient

    from app.main import create_app

    sae = args.sae
    paths = {
        "SAE page": lambda i: f"/saes/{sae}?offset={i * 50 % 4000}",
        "features API (max_act desc)": lambda i: f"/api/v1/saes/{sae}/features?sort=max_act&order=desc&offset={i * 50 % 4000}",
        "SAE detail API": lambda i: f"/api/v1/saes/{sae}?i={i}",
        "SAE list API": lambda i: f"/api/v1/saes?i={i}",
        "feature page": lambda i: f"/saes/{sae}/features/{i}",
    }
    with TestClient(create_app(args.db)) as client:
        for name, path in paths.items():
            for i in range(20):  # warm-up: vocabulary, statement caches
                assert client.get(path(i)).status_code == 200, path(i)
            rounds, cpu = [], []
            for r in range(args.rounds):
                t, c = time.perf_counter(), time.process_time()
                for i in range(args.n):
                    client.get(path(r * args.n + i))
                rounds.append((time.perf_counter() - t) / args.n)
                cpu.append((time.process_time() - c) / args.n)
            print(
                f"| {name} | {statistics.median(rounds) * 1e3:.2f} ms | min {min(rounds) * 1e3:.2f} "
                f"| CPU {statistics.median(cpu) * 1e3:.2f} ms | min {min(cpu) * 1e3:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
