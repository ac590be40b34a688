"""Search by meaning at scale: exact cosine search against faiss's inverted-file index (store/explanation_search.py).

    python bench/semantic_index.py [--sizes 16384,65536,1048576] [--queries 200]

For each size, unit vectors of 384 dimensions around 1,024 random topics (as explanations of related
features gather; the same shape bench/store_scale.py writes into its synthetic stores), indexed as a
server process indexes a run above EXACT_MAX; then the same queries both ways. It prints the index's
build time, the lists it scans, recall@50 of the index against the exact top 50, and the median
query time of each. Goal (issue 21): a query at 1M explanations costs about what an exact query costs
at 16k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_core.store.explanation_search import RunEmbeddings, build_ivf  # noqa: E402

TOPICS = 1024
DIM = 384


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def median_ms(run: RunEmbeddings, queries: np.ndarray, k: int) -> tuple[float, list[set[int]]]:
    times, tops = [], []
    for q in queries:
        t0 = time.perf_counter()
        tops.append({r for r, _ in run.nearest(q, k)})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, tops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,65536,1048576")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    queries = clustered(args.queries, rng, centres)
    print("| explanations | index build s | lists scanned / lists | recall@50 | exact ms | index ms |\n|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        matrix = clustered(n, rng, centres)
        keys = [(i, "n2g") for i in range(n)]
        exact_ms, exact_tops = median_ms(RunEmbeddings(keys, matrix), queries, 50)
        t0 = time.perf_counter()
        ivf = build_ivf(matrix)
        build_s = time.perf_counter() - t0
        index_ms, index_tops = median_ms(RunEmbeddings(keys, None, ivf), queries, 50)
        recall = statistics.mean(len(a & b) / 50 for a, b in zip(exact_tops, index_tops))
        print(f"| {n:,} | {build_s:.1f} | {ivf.nprobe} / {ivf.nlist} | {recall:.3f} | {exact_ms:.2f} | {index_ms:.2f} |", flush=True)
        del matrix, ivf


if __name__ == "__main__":
    main()
