"""saescope: one full trainer step (sparse loss and gradients, parallel-gradient removal, fused Adam,
decoder renormalisation), exactly what `sae_core.train` runs per batch.

--profile N: after the timing, run N more steps under torch.profiler and print where the time went
(operators by self CPU time; with --device cuda also by self GPU time)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import CONFIGS, dead_mask, parse_args, report, structured_batches, synchronize, time_steps  # noqa: E402

from sae_core.hardware import keep_large_buffers  # noqa: E402
from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402

keep_large_buffers()     # as sae_core.train.train does before its first step

args = parse_args(lambda ap: ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps"))
c = CONFIGS[args.config]
torch.manual_seed(0)
sae = TopKSAE(TopKConfig(d_in=c["d"], n_latents=c["n"], k=c["k"])).to(args.device)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10, fused=True)
dead = dead_mask(c["n"], args.auxk == "on", device=args.device)


def step(x):
    sae.loss_and_grads(x, dead, autocast_bf16=args.dtype == "bf16")
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()


batches = structured_batches(c["d"], c["n"], c["batch"], device=args.device)
report("saescope", "main", time_steps(step, batches, args.steps))
if args.profile:
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(args.device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for i in range(args.profile):
            step(batches[i % len(batches)])
        synchronize(args.device)
    for key in (["self_cuda_time_total"] if on_gpu else []) + ["self_cpu_time_total"]:   # on a GPU: where each side spends it
        print(prof.key_averages().table(sort_by=key, row_limit=30))
