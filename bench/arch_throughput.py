"""Tokens/s of one training step of BatchTopK, JumpReLU and Matryoshka BatchTopK: saescope against SAELens'
own implementation of each, same CPU, same run, SAELens in its own virtual environment (issue 28, item 5).

    python bench/arch_throughput.py [--config A] [--steps 5] [--archs batchtopk jumprelu matryoshka_batchtopk] [--install]

Cells as bench/train_throughput.py's config A (d 576, 16,384 latents, k 32, batch 4,096, fp32) on its data
(32-sparse mixes of a random dictionary plus noise, bench/peers/common.py), median tokens/s of --steps
steps after 2 warm-up steps, each (trainer, architecture) in a fresh process.
- saescope: what `saescope train` runs per batch (sae_core/train.py): the SAE's loss_and_grads, the decoder
  gradients' parallel part removed, fused Adam, the decoder renormalised.
- SAELens: one `SAETrainer.step` of its BatchTopKTrainingSAE, JumpReLUTrainingSAE or
  MatryoshkaBatchTopKTrainingSAE (matryoshka_widths n/16, n/4, n as ours by default).
BatchTopK and Matryoshka: AuxK on for both (10% of latents marked dead, coefficient 1/32). JumpReLU: both
start from the same tied weights with every threshold at the value that leaves ~k latents active per token
on the first batch (the sparse regime most of training is in; at the init of the paper, theta = 0.001,
about half the latents fire and saescope runs dense products, as SAELens always does), bandwidth 0.001,
L0 coefficient 1e-3. The SAELens venv is bench/out/venv-sae-lens (tests/saelens_env.py builds it;
--install here does too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from common import CONFIGS, dead_mask, report, structured_batches, time_steps  # noqa: E402

ARCHS = ["batchtopk", "jumprelu", "matryoshka_batchtopk"]
VENV_PYTHON = ROOT / "bench" / "out" / "venv-sae-lens" / "bin" / "python"
BANDWIDTH, L0_COEF = 1e-3, 1e-3


def tied_weights(d: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (W_dec [n, d] unit rows, W_enc [n, d] = W_dec) in every process."""
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    return W, W.clone()


def sparse_threshold(x: torch.Tensor, W_enc: torch.Tensor, k: int) -> float:
    """The one threshold leaving k latents per token active on average over batch x (zero biases)."""
    return float((x @ W_enc.T).flatten().topk(k * len(x)).values.min())


def saescope_step(arch: str, c: dict, batches: list[torch.Tensor], dead: torch.Tensor):
    sys.path.insert(0, str(ROOT))
    from sae_core.hardware import keep_large_buffers
    from sae_core.sae import ARCHITECTURES

    keep_large_buffers()  # as sae_core.train does before its first step
    config_cls, sae_cls = ARCHITECTURES[arch]
    settings = {"bandwidth": BANDWIDTH, "l0_coef": L0_COEF} if arch == "jumprelu" else {"k": c["k"]}
    sae = sae_cls(config_cls(d_in=c["d"], n_latents=c["n"], **settings))
    W_dec, W_enc = tied_weights(c["d"], c["n"])
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_enc)
        if arch == "jumprelu":
            sae.log_threshold.fill_(float(torch.tensor(sparse_threshold(batches[0], W_enc, c["k"])).log()))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10, fused=True)
    steps = [0]

    def step(x):
        sae.begin_step(steps[0])
        sae.loss_and_grads(x, dead)
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        steps[0] += 1

    return step, "main"


def saelens_step(arch: str, c: dict, batches: list[torch.Tensor], dead: torch.Tensor):
    from importlib.metadata import version

    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, n, k = c["d"], c["n"], c["k"]
    sae: torch.nn.Module
    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, aux_loss_coefficient=1 / 32))
    elif arch == "matryoshka_batchtopk":
        widths = [n // 16, n // 4, n]
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, aux_loss_coefficient=1 / 32, matryoshka_widths=widths)
        )
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=n, jumprelu_bandwidth=BANDWIDTH, l0_coefficient=L0_COEF))
    W_dec, W_enc = tied_weights(d, n)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_enc.T)  # SAELens keeps W_enc as [d_in, d_sae]
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if arch == "jumprelu":
            sae.threshold.fill_(sparse_threshold(batches[0], W_enc, k))
    cfg = SAETrainerConfig(
        total_training_samples=10**9,
        train_batch_size_samples=c["batch"],
        lr=2e-4,
        lr_end=2e-4,
        device="cpu",
        autocast=False,
        dead_feature_window=1000,
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    def step(x):
        trainer.n_forward_passes_since_fired[dead] = 10**6
        trainer.step(x)

    return step, version("sae-lens")


def drive(trainer: str, arch: str, config: str, steps: int) -> None:
    """One (trainer, architecture) cell in this process: prints report()'s JSON line."""
    c = CONFIGS[config]
    torch.manual_seed(0)
    batches = structured_batches(c["d"], c["n"], c["batch"])
    dead = dead_mask(c["n"], arch != "jumprelu")  # JumpReLU has no AuxK: dead latents change nothing in its step
    step, variant = (saescope_step if trainer == "saescope" else saelens_step)(arch, c, batches, dead)
    report(trainer, variant, time_steps(step, batches, steps))


def run(python: str, trainer: str, arch: str, config: str, steps: int) -> dict:
    proc = subprocess.run(
        [python, __file__, "--drive", trainer, "--arch", arch, "--config", config, "--steps", str(steps)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, default="A")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--archs", nargs="+", choices=ARCHS, default=ARCHS)
    ap.add_argument("--install", action="store_true", help="build the SAELens venv first when it is missing")
    ap.add_argument("--drive", choices=["saescope", "sae-lens"], help=argparse.SUPPRESS)  # one cell, in a child process
    ap.add_argument("--arch", choices=ARCHS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        drive(args.drive, args.arch, args.config, args.steps)
        return
    if args.install and not VENV_PYTHON.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        import saelens_env

        saelens_env.python_or_skip()
    if not VENV_PYTHON.exists():
        sys.exit(f"no SAELens venv at {VENV_PYTHON.parent.parent}: run with --install")
    c = CONFIGS[args.config]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"config {args.config} (d {c['d']}, {c['n']} latents, k {c['k']}, batch {c['batch']}), fp32, median of {args.steps} steps"
    )
    print("| architecture | saescope tok/s (RSS MB) | sae-lens tok/s (RSS MB) | saescope / sae-lens |\n|---|---|---|---|")
    for arch in args.archs:
        ours = run(sys.executable, "saescope", arch, args.config, args.steps)
        theirs = run(str(VENV_PYTHON), "sae-lens", arch, args.config, args.steps)
        cells = [f"{r['tok_s']:,.0f} ({r['rss_mb']:,.0f})" if "tok_s" in r else f"failed: {r['error']}" for r in (ours, theirs)]
        ratio = f"{ours['tok_s'] / theirs['tok_s']:.2f}x" if "tok_s" in ours and "tok_s" in theirs else "–"
        label = f"{arch} (sae-lens {theirs.get('version', '?')})"
        print(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
