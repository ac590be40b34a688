"""Data-parallel gradient reduction for SAEs whose backward is hand-written (DDP's autograd hooks never
see it): after each rank's `loss_and_grads` over its part of the batch, with the loss denominators of
the whole batch (`group_sum`), the gradients are summed over the data-parallel group, which gives the
global batch's gradient; the fired masks and the statistics go along in one more buffer.

All the reductions are in flight at once (one wait for the lot). Overlapping them with the backward
itself does not pay on the CPU, where the collectives run on the same cores as the products; on GPUs
(NCCL) W_dec's reduction could start while W_enc's gradient is computed: bench/distributed.py
measures what the reduction costs first.
"""

from __future__ import annotations

import dataclasses

import torch

from ..sae.base import StepLosses
from .comms import Comms


def reduce_step(params: list[torch.nn.Parameter], stats: StepLosses, dp: Comms) -> StepLosses:
    """Sum the gradients of `params` over `dp` in place and reduce `stats` (loss, fvu and aux_fvu are
    shares of the global sums, l0 a mean over equal parts, `fired` an OR); a group of one returns them as they are."""
    if dp.size == 1:
        return stats
    fired = stats.fired
    summary = torch.cat([fired.float(), torch.tensor([stats.loss, stats.fvu, stats.aux_fvu, stats.l0], device=fired.device)])
    dp.sum_all_([p.grad for p in params if p.grad is not None] + [summary])
    loss, fvu, aux_fvu, l0 = summary[len(fired) :].tolist()
    return dataclasses.replace(stats, loss=loss, fvu=fvu, aux_fvu=aux_fvu, l0=l0 / dp.size, fired=summary[: len(fired)] > 0)
