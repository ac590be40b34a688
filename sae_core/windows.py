"""The one window-batch path: token windows in the corpus's fixed order -> the model cut at the hook ->
rows without the skipped positions (the attention sink). The cache, the stream, the miner and the live
runtime all take their batches from a `WindowSource`; where an activation cache already holds the
windows, they are read from it instead of running the model again.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np
import torch

from . import corpus as corpus_mod
from .model import LanguageModel, parse_hook_point

if TYPE_CHECKING:
    from .config import CacheConfig


@dataclass
class WindowBatch:
    """Consecutive windows with their residuals at the hook (positions before skip_positions dropped)."""

    tokens: np.ndarray  # [windows, context_size] int32, as are doc_index and doc_offset
    doc_index: np.ndarray
    doc_offset: np.ndarray
    acts: torch.Tensor  # [windows, context_size - skip_positions, d_model]

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def cat(parts: list[WindowBatch]) -> WindowBatch:
        if len(parts) == 1:
            return parts[0]
        dtype = functools.reduce(torch.promote_types, (p.acts.dtype for p in parts))  # a lossless common dtype
        return WindowBatch(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.doc_index for p in parts]),
            np.concatenate([p.doc_offset for p in parts]),
            torch.cat([p.acts.to(parts[-1].acts.device, dtype) for p in parts]),
        )


class CachedWindows(Protocol):
    """What a WindowSource reads cached windows from: cache.ActivationCache, which owns reading its shards
    (a shard of `windows_per_shard` windows: `tokens`, `doc_index`, `doc_offset` per window and
    `activations` with `rows_per_window` rows per window)."""

    rows_per_window: int

    @property
    def windows_per_shard(self) -> int: ...

    @property
    def whole_windows(self) -> int: ...

    def read_shard(self, i: int) -> dict[str, torch.Tensor]: ...


class WindowSource:
    """Windows in the corpus's fixed order from window `start` on, with their residuals at the hook: read
    from the shards of `from_cache` (a cache of the same windows: see `reusable_cache`) while it holds
    them, computed by the model after that. Batches are cut exactly as asked whatever their
    source, so the rows an encoder sees together do not depend on where they came from."""

    def __init__(
        self,
        lm: LanguageModel,
        corpus: corpus_mod.Corpus,
        cfg: CacheConfig,
        start: int,
        from_cache: CachedWindows | None = None,
    ):
        self.lm, self.corpus, self.cfg, self.layer, self.pos = lm, corpus, cfg, parse_hook_point(cfg.hook).layer, start
        self.cached = from_cache
        self.n_cached = from_cache.whole_windows if from_cache is not None else 0
        self.windows: Iterator[corpus_mod.Windows] | None = None  # opened at the first window past the cache
        self.shard: tuple[int, dict[str, torch.Tensor]] = (-1, {})

    def take(self, n: int) -> WindowBatch | None:
        """The next `n` windows; fewer where the corpus ends, None after its end."""
        parts = []
        while n > 0 and self.pos < self.n_cached:
            parts.append(self._read(n))
            n -= len(parts[-1])
        if n > 0 and (part := self._run(n)) is not None:
            parts.append(part)
        return WindowBatch.cat(parts) if parts else None

    def _read(self, n: int) -> WindowBatch:
        assert self.cached is not None  # only called while pos < n_cached
        i, local = divmod(self.pos, self.cached.windows_per_shard)
        if self.shard[0] != i:
            self.shard = (i, self.cached.read_shard(i))
        t = self.shard[1]
        m = min(n, len(t["tokens"]) - local, self.n_cached - self.pos)
        rows = self.cached.rows_per_window
        acts = t["activations"][local * rows : (local + m) * rows].view(m, rows, -1)
        self.pos += m
        return WindowBatch(
            t["tokens"][local : local + m].numpy(),
            t["doc_index"][local : local + m].numpy(),
            t["doc_offset"][local : local + m].numpy(),
            acts,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's activations at the hook for windows `tokens` [windows, context_size]."""
        return self.lm.activations(tokens, self.cfg.hook)

    def _run(self, n: int) -> WindowBatch | None:
        cfg = self.cfg
        if self.windows is None:
            self.shard = (-1, {})
            self.windows = corpus_mod.iter_windows(self.corpus, self.lm.tokenizer, cfg.context_size, cfg.seed, skip_windows=self.pos)
        batch = list(itertools.islice(self.windows, n))
        if not batch:
            return None
        tokens = np.concatenate([w.tokens for w in batch])
        acts = self.forward(torch.from_numpy(tokens).long())[:, cfg.skip_positions :]
        self.pos += len(batch)
        return WindowBatch(tokens, np.concatenate([w.doc_index for w in batch]), np.concatenate([w.doc_offset for w in batch]), acts)
