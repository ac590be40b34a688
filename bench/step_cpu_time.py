"""CPU seconds per step of the trainer's whole TopK step, for side-by-side runs of two trees on a loaded machine.

    THREADS=2 PYTHONPATH=<tree> python bench/step_cpu_time.py on|off [steps]

Config A of bench/train_throughput.py (d 576, 16,384 latents, k 32, batch 4,096, fp32); "on": 10% of the
latents marked dead so AuxK runs. One step: the SAE's loss_and_grads, the decoder gradients' parallel part
removed, fused Adam, the decoder renormalised (what sae_core/train.py runs per batch). Prints the median
over `steps` steps after 2 warm-up ones of the process time (what the code costs, less moved by other
processes than wall time on a shared machine) and of the wall time. Run the two trees alternately.
"""

import os
import statistics
import sys
import time

import torch

from sae_core.sae import TopKConfig, TopKSAE

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
torch.manual_seed(0)
d, n, k, B = 576, 16384, 32, 4096
auxk = sys.argv[1] if len(sys.argv) > 1 else "on"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
sae = TopKSAE(TopKConfig(d_in=d, n_latents=n, k=k))
opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
dead = torch.zeros(n, dtype=torch.bool)
if auxk == "on":
    dead[torch.randperm(n)[: n // 10]] = True
x = torch.randn(B, d)
cpu, wall = [], []
for i in range(steps + 2):
    t0, c0 = time.perf_counter(), time.process_time()
    sae.loss_and_grads(x, dead)
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()
    if i >= 2:
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
c, w = statistics.median(cpu), statistics.median(wall)
print(f"auxk {auxk}: cpu {c:.3f} s/step, wall {w:.3f} s/step ({B / c:,.0f} tok/cpu-s)")
