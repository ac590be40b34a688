"""eai-sparsify: the training step of `sparsify.Trainer.fit`, on its public `SparseCoder` class.

Per step, as its trainer does: unit-norm the decoder, forward with the dead mask, loss
fvu + auxk_alpha * auxk_loss (auxk_alpha 1/32, its default), backward, remove the gradient parallel
to the decoder directions, Adam (torch.optim.Adam with its width-scaled lr). The trainer has no
autocast of its own on CPU; bf16 wraps the forward in torch.autocast as the other drivers do.
"""

import contextlib
import sys
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, dead_mask, parse_args, report, structured_batches, time_steps  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

args = parse_args()
c = CONFIGS[args.config]
torch.manual_seed(0)
sae = SparseCoder(c["d"], SparseCoderConfig(num_latents=c["n"], k=c["k"]), device=args.device)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (c["n"] / 2**14) ** 0.5)
dead = dead_mask(c["n"], args.auxk == "on", device=args.device)
autocast = (
    (lambda: torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
)


def step(x):
    sae.set_decoder_norm_to_unit_norm()
    with autocast():
        out = sae(x, dead_mask=dead if args.auxk == "on" else None)
        loss = out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()


report(
    "eai-sparsify",
    version("eai-sparsify"),
    time_steps(step, structured_batches(c["d"], c["n"], c["batch"], device=args.device), args.steps),
)
