"""What every training-step driver shares (ours and the peers', each run in its own venv): the
configurations, DESIGN §7's structured random data, the dead mask, timing, and the JSON it prints.
Depends on torch only, so every peer's venv can import it."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

CONFIGS = {"A": dict(d=576, n=16384, k=32, batch=4096), "B": dict(d=768, n=32768, k=32, batch=4096)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=CONFIGS, default="A")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--auxk", choices=["on", "off"], default="on")
    ap.add_argument("--steps", type=int, default=10)
    return ap.parse_args()


def structured_batches(d: int, n: int, batch: int, count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """32-sparse non-negative mixes of a random unit-norm dictionary plus noise."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    out = []
    for _ in range(count):
        idx = torch.randint(0, n, (batch, 32), generator=gen)
        coef = torch.rand(batch, 32, generator=gen)
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=coef, mode="sum")
        out.append(x + 0.05 * torch.randn(batch, d, generator=gen))
    return out


def dead_mask(n: int, on: bool, seed: int = 1) -> torch.Tensor:
    """10% of latents marked dead (so every trainer runs its AuxK path), or none."""
    mask = torch.zeros(n, dtype=torch.bool)
    if on:
        mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 10]] = True
    return mask


def time_steps(step, batches: list[torch.Tensor], steps: int) -> float:
    """Median tokens/s of `step(x)` over `steps` steps after 2 warm-up steps."""
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return len(batches[0]) / times[len(times) // 2]


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; ru_maxrss
    carries over the peak of the process that spawned us (the orchestrator, grown by its roofline)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(name: str, version: str, tok_s: float) -> None:
    rss = peak_rss_mb()
    print(json.dumps({"trainer": name, "version": version, "tok_s": tok_s, "rss_mb": rss}))
