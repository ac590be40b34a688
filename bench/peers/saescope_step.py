"""saescope: one full trainer step (sparse loss and gradients, parallel-gradient removal, fused Adam,
decoder renormalisation), exactly what `sae_core.train` runs per batch.

--compile: the loss and gradients through sae_core.sae.compiled (what `saescope train --compile` runs);
the first steps compile and, on CUDA, record the CUDA graph, so they are warm-up, untimed.

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
from sae_core.sae.compiled import CompiledTopK  # noqa: E402

keep_large_buffers()  # as sae_core.train.train does before its first step


def add_arguments(ap):
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps")
    ap.add_argument("--compile", action="store_true", help="the compiled step (saescope train --compile)")
    ap.add_argument("--topk-chunks", type=int, default=0, metavar="C", help="compiled: top-k in two stages over C column chunks")


args = parse_args(add_arguments)
c = CONFIGS[args.config]
torch.manual_seed(0)
sae = TopKSAE(TopKConfig(d_in=c["d"], n_latents=c["n"], k=c["k"])).to(args.device)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10, fused=True)
dead = dead_mask(c["n"], args.auxk == "on", device=args.device)
loss_and_grads = CompiledTopK(sae, topk_chunks=args.topk_chunks).loss_and_grads if args.compile else sae.loss_and_grads


def step(x):
    loss_and_grads(x, dead, autocast_bf16=args.dtype == "bf16")
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()


batches = structured_batches(c["d"], c["n"], c["batch"], device=args.device)
# compiled: call 1 compiles, on CUDA call 2 records the graph (cudagraph trees warm up once first), later calls replay
variant = "main" if not args.compile else f"compiled, top-k over {args.topk_chunks} chunks" if args.topk_chunks else "compiled"
report("saescope", variant, time_steps(step, batches, args.steps, warmup=4 if args.compile else 2))
if args.profile:
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(args.device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for i in range(args.profile):
            step(batches[i % len(batches)])
        synchronize(args.device)
    for key in (["self_cuda_time_total"] if on_gpu else []) + ["self_cpu_time_total"]:  # on a GPU: where each side spends it
        print(prof.key_averages().table(sort_by=key, row_limit=30))
