"""Activations streamed from the model instead of read from a cache: what `saescope train` trains on
when no --activations folder is given.

`ModelStream` offers the trainer the same small interface as `cache.ActivationCache` (d_model,
n_windows, n_rows, config, sample, batches), so the training loop does not know the difference.
Windows come in the cache's order (same corpus, seed and context), so `saescope eval` finds its
held-out windows after the streamed ones exactly as after a cache's. Rows are shuffled within groups
of windows holding at least `GROUP_BATCHES` batches (a group's leftover rows are dropped, at most one
batch in `GROUP_BATCHES`), so resuming at batch b re-runs the model on one group only, and the
batches after a resume are the same, bit for bit, as those of an uninterrupted run. Each group's
windows go through the model in forward batches cut from the group's first window, so a resumed
stream runs the model on the very batches (shapes included) the uninterrupted one ran: a GEMM's
rounding may depend on its shape and the thread count, its inputs' values alone do not fix it.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator

import torch

from . import corpus as corpus_mod
from .config import CacheConfig
from .errors import SaescopeError
from .model import LanguageModel, load_model, parse_hook_point
from .windows import WindowSource


class ModelStream:
    GROUP_BATCHES = 16

    def __init__(self, cfg: CacheConfig, lm: LanguageModel | None = None):
        if cfg.tokens <= 0:
            raise SaescopeError("--tokens must be positive when training streams from the model")
        if not 0 <= cfg.skip_positions < cfg.context_size:
            raise SaescopeError("--skip-positions must be smaller than --context-size")
        self.cfg = cfg
        self.layer = parse_hook_point(cfg.hook).layer
        self.lm = lm or load_model(cfg.model, cfg.device, cfg.model_dtype)
        self.lm.check_layer(self.layer)
        self.corpus = corpus_mod.open_corpus(cfg.corpus)
        self.d_model = self.lm.d_model
        self.rows_per_window = cfg.context_size - cfg.skip_positions
        self.n_windows = cfg.n_windows
        self.n_rows = self.n_windows * self.rows_per_window
        self.config = {**cfg.identity(), "streamed": True}  # what eval and mine read: model, hook, corpus...
        self.part = (0, 1)  # (rank, world) of a data-parallel share

    def share(self, rank: int, world: int) -> ModelStream:
        """What data-parallel rank `rank` of `world` trains on: a contiguous run of the shuffle groups (so
        one tokenising pass), cut to the batches the smallest share holds (the ranks step together)."""
        part = copy.copy(self)
        part.part = (rank, world)
        return part

    def _groups(self, batch_size: int) -> list[tuple[int, int, int]]:
        """(first window, windows, whole batches) of every shuffle group."""
        group = self._group(batch_size)
        return [
            (start, min(group, self.n_windows - start), min(group, self.n_windows - start) * self.rows_per_window // batch_size)
            for start in range(0, self.n_windows, group)
        ]

    def _owned(self, n_groups: int, rank: int) -> range:
        world = self.part[1]
        return range(rank * n_groups // world, (rank + 1) * n_groups // world)

    def _windows(self, start: int) -> WindowSource:
        return WindowSource(self.lm, self.corpus, self.cfg, start)

    def _activations(self, source: WindowSource, first: int, count: int) -> torch.Tensor:
        """Rows of windows first .. first + count - 1, the next ones of `source`, [rows, d_model] float32 on the CPU."""
        out, left = [], count
        while left > 0:
            batch = source.take(min(self.cfg.batch_size, left))
            if batch is None:
                raise SaescopeError(
                    f"the corpus {self.cfg.corpus!r} ended after {first + count - left} windows; "
                    f"ask for fewer --tokens than {self.cfg.tokens:,}"
                )
            out.append(batch.acts.float().reshape(-1, self.d_model).cpu())
            left -= len(batch)
        return torch.cat(out)

    def sample(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """About `n` rows from the first windows (for the input scale and the b_pre init)."""
        return self._activations(self._windows(0), 0, min(self.n_windows, math.ceil(n / self.rows_per_window)))[:n].to(dtype)

    def _group(self, batch_size: int) -> int:
        """Windows per shuffle group: enough rows for GROUP_BATCHES batches."""
        return math.ceil(self.GROUP_BATCHES * batch_size / self.rows_per_window)

    def batches(
        self, batch_size: int, seed: int = 0, skip: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Iterator[torch.Tensor]:
        """One pass of shuffled batches, starting after the first `skip` (whose groups are not computed)."""
        groups = self._groups(batch_size)
        owned, limit = self._owned(len(groups), self.part[0]), self.batches_per_pass(batch_size)
        gen = torch.Generator().manual_seed(seed)
        emitted, source = 0, None
        for g, (start, count, n_batches) in enumerate(groups):
            perm = torch.randperm(count * self.rows_per_window, generator=gen)  # drawn even when skipped: same stream
            n_batches = min(n_batches, limit - emitted)
            if g not in owned or n_batches <= 0:
                continue
            if emitted + n_batches <= skip:
                emitted += n_batches
                continue
            source = source or self._windows(start)  # one tokenising pass from here on, not one per group
            rows = self._activations(source, start, count)
            for b in range(n_batches):
                if emitted >= skip:
                    yield rows[perm[b * batch_size : (b + 1) * batch_size]].to(device, dtype)
                emitted += 1

    def batches_per_pass(self, batch_size: int) -> int:
        if self.part[1] > 1:
            groups = self._groups(batch_size)
            return min(sum(groups[g][2] for g in self._owned(len(groups), r)) for r in range(self.part[1]))
        full, last = divmod(self.n_windows, self._group(batch_size))
        return full * (self._group(batch_size) * self.rows_per_window // batch_size) + last * self.rows_per_window // batch_size
