"""What every training-step driver shares (ours and the peers', each run in its own venv): the
configurations, the structured random data of bench/RESULTS.md, the dead mask, timing, and the JSON it prints.
Depends on torch only, so every peer's venv can import it. With --device cuda the data and the dead
mask live on the GPU, every timed step ends with a device synchronisation, and the report adds the
peak GPU memory PyTorch allocated."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

CONFIGS = {"A": dict(d=576, n=16384, k=32, batch=4096), "B": dict(d=768, n=32768, k=32, batch=4096)}


def parse_args(add_arguments=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    if add_arguments:  # a driver's own options
        add_arguments(ap)
    ap.add_argument("--config", choices=CONFIGS, default="A")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--auxk", choices=["on", "off"], default="on")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    return ap.parse_args()


def structured_batches(d: int, n: int, batch: int, count: int = 3, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    """32-sparse non-negative mixes of a random unit-norm dictionary plus noise (drawn on the CPU, so
    every device trains on the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    out = []
    for _ in range(count):
        idx = torch.randint(0, n, (batch, 32), generator=gen)
        coef = torch.rand(batch, 32, generator=gen)
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=coef, mode="sum")
        out.append((x + 0.05 * torch.randn(batch, d, generator=gen)).to(device))
    return out


def dead_mask(n: int, on: bool, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    """10% of latents marked dead (so every trainer runs its AuxK path), or none."""
    mask = torch.zeros(n, dtype=torch.bool)
    if on:
        mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 10]] = True
    return mask.to(device)


def synchronize(device: str) -> None:
    """Wait for the device's queued work: GPU kernels run asynchronously to the Python that launched them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batches: list[torch.Tensor], steps: int, warmup: int = 2) -> float:
    """Median tokens/s of `step(x)` over `steps` steps after `warmup` untimed ones (each step waits for the device)."""
    times = []
    device = str(batches[0].device)
    synchronize(device)
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        synchronize(device)
        if i >= warmup:
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
    out = {"trainer": name, "version": version, "tok_s": tok_s, "rss_mb": peak_rss_mb()}
    if torch.cuda.is_initialized():
        out["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))
