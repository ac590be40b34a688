"""Tokens/s of one saescope TopK training step on DESIGN §7's configurations, with roofline fraction.

    python bench/train_throughput.py [--steps 10] [--configs A B]

Data: 32-sparse mixes of a random unit-norm dictionary plus noise (as DESIGN §7). Each step is the
full step the trainer runs: loss and sparse gradients, parallel-gradient removal, fused Adam,
decoder renormalisation. "AuxK on" forces 10% of latents dead so the AuxK path runs. Reported:
median tokens/s over `--steps` steps after two warm-up steps, peak RSS, and the share of the
one-dense-matmul roofline (the encoder's [batch, d] @ [d, n] product timed alone, same dtype).

Peers (eai-sparsify, sae-lens, dictionary-learning) are not yet driven from here: see
bench/RESULTS.md for the figures DESIGN §7 measured on this kind of machine.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402

CONFIGS = {"A": dict(d=576, n=16384, k=32, batch=4096), "B": dict(d=768, n=32768, k=32, batch=4096)}


def structured_batch(dictionary: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    n, d = dictionary.shape
    idx = torch.randint(0, n, (batch, 32), generator=gen)
    coef = torch.rand(batch, 32, generator=gen)
    x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=coef, mode="sum")
    return x + 0.05 * torch.randn(batch, d, generator=gen)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def roofline(d: int, n: int, batch: int, bf16: bool, reps: int = 5) -> float:
    a, b = torch.randn(batch, d), torch.randn(d, n)
    if bf16:
        a, b = a.bfloat16(), b.bfloat16()
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return batch / median(times)


def measure(d: int, n: int, k: int, batch: int, bf16: bool, auxk: bool, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    data = [structured_batch(dictionary, batch, gen) for _ in range(3)]
    sae = TopKSAE(TopKConfig(d_in=d, n_latents=n, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10, fused=True)
    dead = torch.zeros(n, dtype=torch.bool)
    if auxk:
        dead[torch.randperm(n, generator=gen)[: n // 10]] = True
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        sae.loss_and_grads(data[step % 3], dead, autocast_bf16=bf16)
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return batch / median(times)


def run_cell(name: str, bf16: bool, auxk: bool, steps: int) -> str:
    c = CONFIGS[name]
    tps = measure(c["d"], c["n"], c["k"], c["batch"], bf16, auxk, steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process ran only this cell
    roof = roofline(c["d"], c["n"], c["batch"], bf16)
    return f"{name:<7}{'bf16' if bf16 else 'fp32':<7}{'on' if auxk else 'off':<6}{tps:>9,.0f}{roof:>16,.0f}{tps / roof:>13.0%}{rss:>13,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", nargs="+", default=["A", "B"])
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell in a fresh process
    args = ap.parse_args()
    if args.cell:
        name, dtype, aux = args.cell.split(",")
        print(run_cell(name, dtype == "bf16", aux == "on", args.steps))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps, one process per cell")
    print(f"{'config':<7}{'dtype':<7}{'AuxK':<6}{'tok/s':>9}{'roofline tok/s':>16}{'of roofline':>13}{'peak RSS MB':>13}")
    for cell in ("A,fp32,on", "A,fp32,off", "A,bf16,on", "B,fp32,on", "B,bf16,on"):
        if cell.split(",")[0] in args.configs:
            out = subprocess.run([sys.executable, __file__, "--cell", cell, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
