"""Co-activation: which features fire on the same tokens as each feature, counted during mining (a statistic
of the miner's sweep beside feature_stats, so below the store and the relations/ stages that read it back).

The miner's statistics sweep (feature_stats.compute, sweep A) already reads every position's code once;
`CoactivationCounter.add` takes the same (row, feature) pairs of each chunk and adds every pair of features
active at one position to a running count. So there is no second pass over the tokens, and what makes the chunks
resumable and mergeable makes this so too: a killed run re-counts from its kept chunks, and a merge of
mining parts (distributed/mining_parts.py) feeds every part's chunks through the same sweep.

Two ways to count, chosen by width. Up to `dense_bytes` (1 GiB: 16,384 latents) the upper triangle
(i < j, the matrix is symmetric) goes into a dense int32 [n, n] array, one increment per co-firing pair
of a position in a compiled loop (numba, already brought by umap-learn): k(k-1)/2 = 496 increments per
position at k=32, each within one 4n-byte row. Wider SAEs (65k latents: a dense count would take 16 GiB)
keep a sparse count: batches of chunks' [positions, n_latents] indicator matrices A, A^T A added up (a
scipy product, single-threaded, k^2 pairs per position), whose memory is the number of distinct
co-firing pairs (8 bytes each, both orders), not n^2. On the demo's 8k SAE and 65,536 positions the dense
count with its compiled top-partner pass took ~1.9 s against ~3.3 s for the sparse one (bench/RESULTS.md).
`top_partners` turns the counts into each feature's strongest partners by Jaccard
index (co-fired / fired by either), which does not favour features that fire everywhere; the count and
P(partner | feature) are kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
import torch

DENSE_BYTES = 1 << 30  # the dense upper-triangle count's cap: n^2 int32 <= 1 GiB, i.e. up to 16,384 latents


@numba.njit(cache=True, nogil=True)
def _count_upper(counts: np.ndarray, rows: np.ndarray, features: np.ndarray, fired: np.ndarray) -> None:
    """counts[i, j] += 1 (i < j) for every pair of features active at one position; `rows` grouped by position."""
    start, total = 0, len(rows)
    while start < total:
        end = start + 1
        while end < total and rows[end] == rows[start]:
            end += 1
        for a in range(start, end):
            fa = features[a]
            fired[fa] += 1
            for b in range(a + 1, end):
                fb = features[b]
                if fa < fb:
                    counts[fa, fb] += 1
                else:
                    counts[fb, fa] += 1
        start = end


@numba.njit(cache=True, nogil=True, parallel=True)
def _top_dense(counts: np.ndarray, fired: np.ndarray, partners: np.ndarray, both_out: np.ndarray, jac_out: np.ndarray) -> None:
    """Each row's top partners of a full symmetric count by (Jaccard desc, count desc, index asc), kept by
    insertion into the row's `width` slots in one pass over the row; rows run in parallel threads."""
    n, width = counts.shape[0], partners.shape[1]
    for i in numba.prange(n):
        filled = 0
        for j in range(n):
            both = counts[i, j]
            if both == 0 or j == i:
                continue
            jac = both / (fired[i] + fired[j] - both)
            if filled == width and (jac < jac_out[i, width - 1] or (jac == jac_out[i, width - 1] and both <= both_out[i, width - 1])):
                continue
            slot = min(filled, width - 1)
            while slot > 0 and (jac > jac_out[i, slot - 1] or (jac == jac_out[i, slot - 1] and both > both_out[i, slot - 1])):
                partners[i, slot], both_out[i, slot], jac_out[i, slot] = partners[i, slot - 1], both_out[i, slot - 1], jac_out[i, slot - 1]
                slot -= 1
            partners[i, slot], both_out[i, slot], jac_out[i, slot] = j, both, jac
            filled = min(filled + 1, width)


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

    def __init__(self, n_latents: int, batch_entries: int = 1 << 24, dense_bytes: int = DENSE_BYTES):
        self.n, self.batch_entries = n_latents, batch_entries
        self.total: sp.csr_matrix | None = None
        self.rows: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.n_rows = self.n_entries = 0
        # dense upper triangle when it fits the cap, else the sparse product (memory: distinct pairs)
        self.upper: np.ndarray | None = None
        self.fired = np.zeros(n_latents, np.int64)
        if n_latents * n_latents * 4 <= dense_bytes:
            self.upper = np.zeros((n_latents, n_latents), np.int32)

    def add(self, rows: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray) -> None:
        """Count one chunk: `rows[i]` is a position (local to the chunk), `features[i]` a feature active there.
        Each (position, feature) pair must appear once (a code lists a feature at most once per position)."""
        r = np.asarray(rows, dtype=np.int64)
        if len(r) == 0:
            return
        f = np.asarray(features, dtype=np.int64)
        if self.upper is not None:
            if (np.diff(r) < 0).any():  # group each position's features together
                order = np.argsort(r, kind="stable")
                r, f = r[order], f[order]
            _count_upper(self.upper, r, f, self.fired)
            return
        self.rows.append(r + self.n_rows)
        self.features.append(f)
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

    def _mirror(self, tile: int = 1024) -> np.ndarray:
        """The full symmetric count, in place: the lower triangle copied from the upper one tile by tile (no
        second n^2 array; a whole-matrix transpose strides through memory), the diagonal set to the firing
        counts. `add` only writes above the diagonal, so mirroring again after more chunks stays right."""
        assert self.upper is not None
        u, n = self.upper, self.n
        for lo in range(0, n, tile):
            hi = min(n, lo + tile)
            above = np.triu(u[lo:hi, lo:hi], 1)
            u[lo:hi, lo:hi] = above + above.T
            u[hi:, lo:hi] = u[lo:hi, hi:].T
        u[np.arange(n), np.arange(n)] = self.fired
        return u

    def _sparse_candidates(
        self, counts: sp.csr_matrix, lo: int, hi: int, fired: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row - lo, partner, count, Jaccard) of rows lo:hi's entries at or above each row's `width`-th
        Jaccard index: the block's pairs go into a dense [rows, n] block whose row-wise top-k gives the threshold."""
        n = self.n
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
        return r[near], c[near], both[near], jac[near]

    def counts(self) -> sp.csr_matrix:
        """The [n, n] co-firing counts; the diagonal is each feature's firing count."""
        if self.upper is not None:
            return sp.csr_matrix(self._mirror())
        self._count()
        return self.total if self.total is not None else sp.csr_matrix((self.n, self.n), dtype=np.int32)

    def top_partners(self, top: int, block_elements: int = 1 << 23) -> Coactivation:
        """Each feature's `top` partners by Jaccard index (ties: more co-firings, then lower index).

        Per block of rows: the Jaccard indices go into a dense [rows, n] block whose row-wise top-k (torch,
        multi-threaded) gives each row's threshold; only the entries at or above it (the top ones and their
        ties) are sorted exactly. Sorting every co-firing pair instead took most of the sweep's time."""
        counts = self.counts() if self.upper is None else None
        fired = (self.fired if counts is None else counts.diagonal()).astype(np.float64)
        n, width = self.n, max(0, min(top, self.n - 1))
        out = Coactivation(
            np.full((n, width), -1, np.int64),
            np.zeros((n, width), np.int64),
            np.zeros((n, width), np.float32),
            np.zeros((n, width), np.float32),
        )
        if width == 0:
            return out
        if self.upper is not None:  # compiled, one pass over the mirrored count; only [n, width] arrays beside it
            both_top, jac_top = np.zeros((n, width), np.int64), np.zeros((n, width), np.float64)
            _top_dense(self._mirror(), fired, out.partners, both_top, jac_top)
            out.counts[:] = both_top
            out.p_given[:] = both_top / fired[:, None].clip(1)
            out.jaccard[:] = jac_top
            return out
        rows_per_block = max(1, block_elements // n)
        for lo in range(0, n, rows_per_block):
            hi = min(n, lo + rows_per_block)
            assert counts is not None
            r, c, both, jac = self._sparse_candidates(counts, lo, hi, fired, width)
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
