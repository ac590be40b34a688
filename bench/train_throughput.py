"""Tokens/s of one TopK training step: saescope against eai-sparsify, sae-lens and dictionary-learning,
same CPU, same run, each peer in its own virtual environment driven through its own public classes.

    python bench/train_throughput.py [--steps 10] [--configs A B] [--install] [--device cuda] [--compiled]

Cells (bench/RESULTS.md): config A (d 576, 16384 latents, k 32, batch 4096) and B (d 768, 32768 latents),
fp32 and bf16 autocast, "AuxK on" = 10% of latents forced dead so every AuxK path runs. Data:
32-sparse mixes of a random dictionary plus noise (bench/peers/common.py). Each (trainer, cell)
runs in a fresh process: median tokens/s of --steps steps after 2 warm-up steps, and peak RSS.
Roofline: the encoder's dense [batch, d] @ [d, n] matmul alone, same dtype, in this process (for
bf16 on a CPU without bf16 units: the fp32 matmul, which is how saescope computes bf16 there).
Drivers: bench/peers/{saescope,sparsify,saelens,dictlearn}_step.py. Peer venvs live in
bench/out/venv-<peer>; --install creates the missing ones (bench/RESULTS.md has the install notes).
--device cuda runs every trainer and the roofline on the GPU (timings synchronised, memory = peak
GPU memory PyTorch allocated); --peers-here takes the peers from this interpreter instead of their
venvs, for a machine whose image already holds a CUDA torch (install them there with pip).
--compiled adds saescope's compiled step (`saescope train --compile`, sae_core/sae/compiled.py) as columns
of its own: its tokens/s, and its ratio to the eager step and to the fastest peer. Its untimed warm-up
(compiling, on CUDA recording the graph) takes up to a minute per cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "bench" / "peers"
sys.path.insert(0, str(PEERS_DIR))
from common import CONFIGS, synchronize  # noqa: E402

sys.path.insert(0, str(ROOT))
from sae_core.hardware import keep_large_buffers, native_bf16  # noqa: E402

keep_large_buffers()  # the roofline's GEMM outputs, like saescope's step, reuse memory instead of faulting it in

CELLS = [("A", "fp32", "on"), ("A", "fp32", "off"), ("A", "bf16", "on"), ("B", "fp32", "on"), ("B", "bf16", "on")]
TORCH = "torch==2.13.0"
PEERS = {  # name: (driver, pip install steps after torch)
    "eai-sparsify": ("sparsify_step.py", [["eai-sparsify"]]),
    "sae-lens": ("saelens_step.py", [["sae-lens"]]),
    "dictionary-learning": (
        "dictlearn_step.py",
        [
            ["--no-deps", "dictionary-learning"],
            ["--no-deps", "nnsight==0.3.7"],
            ["python-socketio[client]", "zstandard", "pillow", "einops", "datasets", "tqdm", "pydantic", "accelerate", "transformers"],
        ],
    ),
}


def venv_python(peer: str) -> Path:
    return ROOT / "bench" / "out" / f"venv-{peer}" / "bin" / "python"


def install(peer: str) -> None:
    py = venv_python(peer)
    if py.exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH], check=True)
    for pkgs in PEERS[peer][1]:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True)


def run(python: str, driver: str, cell: tuple[str, str, str], steps: int, device: str, extra: tuple[str, ...] = ()) -> dict:
    config, dtype, aux = cell
    proc = subprocess.run(
        [
            python,
            str(PEERS_DIR / driver),
            "--config",
            config,
            "--dtype",
            dtype,
            "--auxk",
            aux,
            "--steps",
            str(steps),
            "--device",
            device,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def best(a: dict, b: dict) -> dict:
    return b if "tok_s" in b and b["tok_s"] > a.get("tok_s", -1) else (a or b)


def roofline(d: int, n: int, batch: int, bf16: bool, device: str, reps: int = 5) -> float:
    a, b = torch.randn(batch, d, device=device), torch.randn(d, n, device=device)
    if bf16 and native_bf16(a.device.type):  # without bf16 units the fastest bf16-exact GEMM is the fp32 one (sae/topk.py)
        a, b = a.bfloat16(), b.bfloat16()
    reps = reps if a.device.type == "cpu" else 50 * reps  # a GPU GEMM takes well under a millisecond
    a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return batch / sorted(times)[reps // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", nargs="+", default=["A", "B"])
    ap.add_argument(
        "--dtypes", nargs="+", default=["fp32", "bf16"], help="PyTorch emulates bf16 GEMMs (slowly) on CPUs without AVX512-BF16/AMX"
    )
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--install", action="store_true", help="create missing peer venvs first")
    ap.add_argument("--repeats", type=int, default=1, help="run every trainer this many times per cell, interleaved; keep the best")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--peers-here", action="store_true", help="the peers are installed in this interpreter (no venvs)")
    ap.add_argument("--compiled", action="store_true", help="also time saescope's compiled step (train --compile), side by side")
    args = ap.parse_args()
    try:
        on_gpu = torch.device(args.device).type == "cuda"
    except RuntimeError:
        ap.error(f"--device {args.device!r}: use cpu or cuda")
    if on_gpu and not torch.cuda.is_available():
        ap.error("--device cuda: this torch build sees no CUDA GPU")
    if args.install:
        for peer in args.peers:
            install(peer)
    python = {p: sys.executable if args.peers_here else str(venv_python(p)) for p in args.peers}
    peers = [p for p in args.peers if Path(python[p]).exists()]
    missing = sorted(set(args.peers) - set(peers))
    where = (
        f"GPU {torch.cuda.get_device_name()}"
        if on_gpu
        else f"CPU {torch.backends.cpu.get_cpu_capability()} ({'with' if native_bf16('cpu') else 'without'} bf16 units)"
    )
    memory, mem = ("GPU MB", "gpu_mb") if on_gpu else ("RSS MB", "rss_mb")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, "
        f"median of {args.steps} steps, one process per trainer and cell, best of {args.repeats} interleaved"
        + (f"; not installed (use --install): {', '.join(missing)}" if missing else "")
    )
    head = (
        f"| cell | saescope tok/s | of roofline | {memory} | "
        + " | ".join(f"{p} tok/s ({memory})" for p in peers)
        + " | vs fastest peer |"
        + (f" compiled tok/s ({memory}) | compiled vs eager | compiled vs fastest peer |" if args.compiled else "")
    )
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for cell in CELLS:
        if cell[0] not in args.configs or cell[1] not in args.dtypes:
            continue
        c = CONFIGS[cell[0]]
        ours, compiled, others = {}, {}, {p: {} for p in peers}
        for _ in range(args.repeats):  # interleaved, best of: the machine's load drifts between processes
            ours = best(ours, run(sys.executable, "saescope_step.py", cell, args.steps, args.device))
            if args.compiled:
                compiled = best(compiled, run(sys.executable, "saescope_step.py", cell, args.steps, args.device, ("--compile",)))
            for p in peers:
                others[p] = best(others[p], run(python[p], PEERS[p][0], cell, args.steps, args.device))
        roof = roofline(c["d"], c["n"], c["batch"], cell[1] == "bf16", args.device)
        rates = [o["tok_s"] for o in others.values() if "tok_s" in o]
        ratio = f"{ours['tok_s'] / max(rates):.2f}x" if rates and "tok_s" in ours else "–"
        cols = [f"{o['tok_s']:,.0f} ({o[mem]:,.0f})" if "tok_s" in o else f"failed: {o['error']}" for o in others.values()]
        tail = ""
        if args.compiled and "tok_s" in compiled:
            vs_eager = f"{compiled['tok_s'] / ours['tok_s']:.2f}x" if "tok_s" in ours else "–"
            vs_peer = f"{compiled['tok_s'] / max(rates):.2f}x" if rates else "–"
            tail = f" {compiled['tok_s']:,.0f} ({compiled[mem]:,.0f}) | {vs_eager} | {vs_peer} |"
        elif args.compiled:
            tail = f" failed: {compiled['error']} | – | – |"
        name = f"{cell[0]} {cell[1]} AuxK {cell[2]}"
        if "tok_s" not in ours:
            print(f"| {name} | failed: {ours['error']} | | | " + " | ".join(cols) + " | – |" + tail, flush=True)
            continue
        print(
            f"| {name} | {ours['tok_s']:,.0f} | {ours['tok_s'] / roof:.0%} | {ours[mem]:,.0f} | "
            + " | ".join(cols)
            + f" | {ratio} |"
            + tail,
            flush=True,
        )


if __name__ == "__main__":
    main()
