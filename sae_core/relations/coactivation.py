"""Co-activation: which features fire on the same tokens as each feature, counted during mining.

The miner's statistics sweep (feature_stats.compute, sweep A) already reads every position's code once;
`CoactivationCounter.add` takes the same (row, feature) pairs of each chunk, builds the chunk's
[rows, n_latents] indicator matrix A and adds A^T A (a sparse product: k^2 pairs per position for a TopK
code) to a running sparse count. So there is no second pass over the tokens, and what makes the chunks
resumable and mergeable makes this so too: a killed run re-counts from its kept chunks, and a merge of
mining parts (distributed/shards.py) feeds every part's chunks through the same sweep.

Memory is the number of distinct co-firing pairs (8 bytes each, both orders), not n_latents^2.
`top_partners` turns the counts into each feature's strongest partners by Jaccard index (co-fired /
fired by either), which does not favour features that fire everywhere; the count and P(partner | feature)
are kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


@dataclass
class Coactivation:
    """Each feature's top co-firing partners, arrays [n_latents, top]; unused slots have partner -1."""

    partners: np.ndarray  # int64 feature indices
    counts: np.ndarray  # int64 positions where both fired
    p_given: np.ndarray  # float32 P(partner fires | feature fires)
    jaccard: np.ndarray  # float32 co-fired / fired by either

    def rows(self, feature: int) -> list[tuple[int, int, float, float]]:
        """(partner, count, P(partner | feature), Jaccard) of one feature, strongest first."""
        keep = self.partners[feature] >= 0
        return list(
            zip(
                self.partners[feature][keep].tolist(),
                self.counts[feature][keep].tolist(),
                self.p_given[feature][keep].tolist(),
                self.jaccard[feature][keep].tolist(),
            )
        )


class CoactivationCounter:
    """Running co-firing counts of n_latents features: `add` each chunk's active (row, feature) pairs.

    Chunks' indicator rows are stacked until they hold `batch_entries` active entries, then counted in one
    sparse product and added to the total (int32 counts: a pair co-fires at most once per position). Few
    large products cost less than one per chunk plus a sum of their results each time."""

    def __init__(self, n_latents: int, batch_entries: int = 1 << 24):
        self.n, self.batch_entries = n_latents, batch_entries
        self.total: sp.csr_matrix | None = None
        self.rows: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.n_rows = self.n_entries = 0

    def add(self, rows: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray) -> None:
        """Count one chunk: `rows[i]` is a position (local to the chunk), `features[i]` a feature active there.
        Each (position, feature) pair must appear once (a code lists a feature at most once per position)."""
        r = np.asarray(rows, dtype=np.int64)
        if len(r) == 0:
            return
        self.rows.append(r + self.n_rows)
        self.features.append(np.asarray(features, dtype=np.int64))
        self.n_rows += int(r.max()) + 1
        self.n_entries += len(r)
        if self.n_entries >= self.batch_entries:
            self._count()

    def _count(self) -> None:
        if not self.rows:
            return
        r, f = np.concatenate(self.rows), np.concatenate(self.features)
        indicator = sp.csr_matrix((np.ones(len(r), dtype=np.int32), (r - r.min(), f)), shape=(int(r.max() - r.min()) + 1, self.n))
        pairs = (indicator.T.tocsr() @ indicator).tocsr()
        self.total = pairs if self.total is None else self.total + pairs
        self.rows, self.features, self.n_entries = [], [], 0

    def counts(self) -> sp.csr_matrix:
        """The [n, n] co-firing counts; the diagonal is each feature's firing count."""
        self._count()
        return self.total if self.total is not None else sp.csr_matrix((self.n, self.n), dtype=np.int32)

    def top_partners(self, top: int, block_elements: int = 1 << 23) -> Coactivation:
        """Each feature's `top` partners by Jaccard index (ties: more co-firings, then lower index).

        Per block of rows: the Jaccard indices go into a dense [rows, n] block whose row-wise top-k (torch,
        multi-threaded) gives each row's threshold; only the entries at or above it (the top ones and their
        ties) are sorted exactly. Sorting every co-firing pair instead took most of the sweep's time."""
        counts = self.counts()
        fired = counts.diagonal().astype(np.float64)
        n, width = self.n, max(0, min(top, self.n - 1))
        out = Coactivation(
            np.full((n, width), -1, np.int64),
            np.zeros((n, width), np.int64),
            np.zeros((n, width), np.float32),
            np.zeros((n, width), np.float32),
        )
        if width == 0:
            return out
        rows_per_block = max(1, block_elements // n)
        for lo in range(0, n, rows_per_block):
            hi = min(n, lo + rows_per_block)
            block = counts[lo:hi].tocoo()
            r, c, both = block.row, block.col, block.data.astype(np.float64)
            off_diagonal = (r + lo != c) & (both > 0)
            r, c, both = r[off_diagonal], c[off_diagonal], both[off_diagonal]
            jac = both / (fired[r + lo] + fired[c] - both)
            # float32 for the threshold: rounding keeps order, so the kept set still holds the exact top `width`
            jac32 = jac.astype(np.float32)
            dense = torch.zeros(hi - lo, n)
            dense[torch.from_numpy(r.astype(np.int64)), torch.from_numpy(c.astype(np.int64))] = torch.from_numpy(jac32)
            threshold = dense.topk(width, dim=1).values[:, -1].numpy()
            near = jac32 >= threshold[r]  # the row's top `width` and every tie with the last of them
            r, c, both, jac = r[near], c[near], both[near], jac[near]
            order = np.lexsort((c, -both, -jac, r))
            r, c, both, jac = r[order], c[order], both[order], jac[order]
            start = np.searchsorted(r, np.arange(hi - lo))
            rank = np.arange(len(r)) - start[r]
            keep = rank < width
            rows, slots = r[keep] + lo, rank[keep]
            out.partners[rows, slots] = c[keep]
            out.counts[rows, slots] = both[keep].astype(np.int64)
            out.p_given[rows, slots] = both[keep] / fired[rows]
            out.jaccard[rows, slots] = jac[keep]
        return out
