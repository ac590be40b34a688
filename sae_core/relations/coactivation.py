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
    """Running co-firing counts of n_latents features: `add` each chunk's active (row, feature) pairs."""

    def __init__(self, n_latents: int):
        self.n = n_latents
        self.total = sp.csr_matrix((n_latents, n_latents), dtype=np.int64)
        self.pending: list[sp.csr_matrix] = []
        self.pending_nnz = 0

    def add(self, rows: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray) -> None:
        """Count one chunk: `rows[i]` is a position (local to the chunk), `features[i]` a feature active there.
        Each (position, feature) pair must appear once (a code lists a feature at most once per position)."""
        r = np.asarray(rows, dtype=np.int64)
        f = np.asarray(features, dtype=np.int64)
        if len(r) == 0:
            return
        n_rows = int(r.max()) + 1
        indicator = sp.csr_matrix((np.ones(len(r), dtype=np.int32), (r, f)), shape=(n_rows, self.n))
        pairs = (indicator.T.tocsr() @ indicator).tocsr()
        self.pending.append(pairs)
        self.pending_nnz += pairs.nnz
        # Fold the pending chunks in once they hold as many entries as the total: each entry is re-added
        # O(log chunks) times instead of once per chunk.
        if self.pending_nnz >= max(self.total.nnz, 1 << 22):
            self._fold()

    def _fold(self) -> None:
        for pairs in self.pending:
            self.total = self.total + pairs.astype(np.int64)
        self.pending, self.pending_nnz = [], 0

    def counts(self) -> sp.csr_matrix:
        """The [n, n] co-firing counts; the diagonal is each feature's firing count."""
        self._fold()
        return self.total

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
            dense = torch.zeros(hi - lo, n, dtype=torch.float64)
            dense[torch.from_numpy(r.astype(np.int64)), torch.from_numpy(c.astype(np.int64))] = torch.from_numpy(jac)
            threshold = dense.topk(width, dim=1).values[:, -1].numpy()
            near = jac >= threshold[r]  # the row's top `width` and every tie with the last of them
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
