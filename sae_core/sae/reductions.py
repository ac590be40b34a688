"""Sums whose rounding does not depend on the number of CPU threads.

PyTorch splits a CPU reduction among its threads when the input holds at least its grain
(`GRAIN_SIZE`, 32,768 elements): `t.sum()` over a whole tensor then adds one partial sum per thread,
and MKL's matrix-vector product `w @ M` splits the summed dimension likewise. The float result then
depends on `torch.get_num_threads()`. In a training step the loss's denominator scales every gradient,
so a run's weights would differ between a 1-thread and an 8-thread process, and a run resumed under
another thread count would leave the uninterrupted one. Reductions along a dimension that is not split
(`t.sum(1)` of a [rows, cols] tensor: one row per thread) keep their order; these helpers are built
from those. On a GPU the plain reductions are already deterministic for a given shape, and are kept
(one kernel instead of several)."""

from __future__ import annotations

import torch

SUM_BLOCK = 1024  # elements per partial sum, below the grain: each block is summed by one thread, in order


def ordered_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of all elements of `t`, in the same order at any thread count: blocks of SUM_BLOCK
    consecutive elements are summed, then their sums in blocks again, until one block is left."""
    if t.device.type != "cpu":
        return t.sum()
    flat = t.reshape(-1)
    while flat.numel() > SUM_BLOCK:
        whole = flat.numel() // SUM_BLOCK * SUM_BLOCK
        sums = flat[:whole].view(-1, SUM_BLOCK).sum(1)
        flat = sums if whole == flat.numel() else torch.cat([sums, flat[whole:].sum().reshape(1)])
    return flat.sum()


def weighted_row_sum(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """w @ rows for w [n] and rows [n, d], in the same order at any thread count: each of the d outputs is
    summed over n by one thread (MKL's gemv splits n among threads). As fast as the gemv on a 2-core CPU
    at 16,384 x 768 (both read the [n, d] matrix once)."""
    if rows.device.type != "cpu":
        return w @ rows
    return (w.unsqueeze(1) * rows).sum(0)
