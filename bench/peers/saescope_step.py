"""saescope: one full trainer step (sparse loss and gradients, parallel-gradient removal, fused Adam,
decoder renormalisation), exactly what `sae_core.train` runs per batch."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import CONFIGS, dead_mask, parse_args, report, structured_batches, time_steps  # noqa: E402

from sae_core.hardware import keep_large_buffers  # noqa: E402
from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402

keep_large_buffers()     # as sae_core.train.train does before its first step

args = parse_args()
c = CONFIGS[args.config]
torch.manual_seed(0)
sae = TopKSAE(TopKConfig(d_in=c["d"], n_latents=c["n"], k=c["k"]))
opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10, fused=True)
dead = dead_mask(c["n"], args.auxk == "on")


def step(x):
    sae.loss_and_grads(x, dead, autocast_bf16=args.dtype == "bf16")
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()


report("saescope", "main", time_steps(step, structured_batches(c["d"], c["n"], c["batch"]), args.steps))
