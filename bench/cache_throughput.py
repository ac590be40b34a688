"""Tokens/s of `saescope cache` against a bare forward pass cut at the same layer, in the same run.

    python bench/cache_throughput.py [--tokens 131072] [--layers 8 15]

The bare forward runs the same windows (pre-tokenised, already in memory) through the model up to
the hooked layer and throws the result away. The cache run does everything `saescope cache` does:
reads and tokenises the corpus, runs the same forward, converts, and writes shards. Model loading is
excluded from both. Goal: the cache costs under 10% over the bare forward.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sae_core.hardware import keep_large_buffers  # noqa: E402

keep_large_buffers()     # what the saescope CLI does at start-up

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sae_core.cache import CacheConfig, build_cache  # noqa: E402
from sae_core.corpus import iter_windows, open_corpus  # noqa: E402
from sae_core.model import load_model  # noqa: E402


def bare_forward(lm, windows: np.ndarray, layer: int, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(windows), batch):
        lm.residuals(torch.from_numpy(windows[i:i + batch]).long(), layer)
    return len(windows) * windows.shape[1] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 15])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="alternating bare/cache runs; best and median are reported")
    args = ap.parse_args()

    lm = load_model("smollm2-135m")
    print(f"model smollm2-135m on {lm.device} in {lm.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    corpus = open_corpus("demo")
    n_windows = args.tokens // 128
    windows = []
    for w in iter_windows(corpus, lm.tokenizer, 128):
        windows.append(w.tokens[0])
        if len(windows) == n_windows:
            break
    windows = np.stack(windows)
    lm.residuals(torch.from_numpy(windows[:args.batch_size]).long(), max(args.layers))  # warm-up

    print(f"\n{n_windows * 128} tokens per measurement, batch {args.batch_size} x 128, {args.repeats} alternating runs each")
    print(f"{'layer':>5} {'bare fwd tok/s best / median':>29} {'cache tok/s best / median':>26} {'overhead best / median':>23}")
    for layer in args.layers:
        bares, caches = [], []
        for _ in range(args.repeats):  # alternate so slow drifts of the machine hit both alike
            bares.append(bare_forward(lm, windows, layer, args.batch_size))
            with tempfile.TemporaryDirectory() as tmp:
                cfg = CacheConfig(hook=f"blocks.{layer}.hook_resid_post", tokens=n_windows * 128, batch_size=args.batch_size)
                start = time.perf_counter()
                build_cache(cfg, Path(tmp) / "cache", lm=lm, progress=False)
                caches.append(n_windows * 128 / (time.perf_counter() - start))
        # best-of is the least disturbed by other load on the machine; the median shows the spread
        b_best, b_med, c_best, c_med = max(bares), float(np.median(bares)), max(caches), float(np.median(caches))
        print(f"{layer:>5} {b_best:>17,.0f} / {b_med:>9,.0f} {c_best:>14,.0f} / {c_med:>9,.0f} "
              f"{b_best / c_best - 1:>13.1%} / {b_med / c_med - 1:>7.1%}")


if __name__ == "__main__":
    main()
