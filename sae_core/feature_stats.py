"""Per-feature statistics and example selection from SAE codes written by `saescope mine` (phase 2).

Input: chunk files, each holding the token windows of a stretch of the corpus plus every position's
SAE code as (values [rows, w], latent indices [rows, w]); zero values are inactive. Three sweeps over
the chunks, each holding only O(n_latents) running state, so memory stays flat however long the
corpus is:

  A. count, sum, min and max of each feature's non-zero activations;
  B. with the range known: the histogram (equal-width bins over [min, max]); the interval counts
     (equal-width intervals over [0, max]); the interval samples, a uniform sample without
     replacement from each interval (bottom-k random keys, i.e. reservoir sampling made
     vectorisable); and the top contexts, at most one per window (each window's max, then a
     running top-N);
  C. the token contexts and this feature's per-token activations of every chosen example.

Every random key comes from a generator seeded by (seed, chunk), so a re-run gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .coactivation import CoactivationCounter
from .config import StatsConfig


@dataclass
class FeatureTables:
    """Everything mined, as arrays. Per feature [n]: counts and moments; per example [E]: one row each."""

    positions: int  # activation positions mined (windows x non-sink positions)
    n_fired: np.ndarray  # [n] int64
    act_sum: np.ndarray  # [n] float64
    act_min: np.ndarray  # [n] float32 (0 where the feature never fired)
    act_max: np.ndarray  # [n] float32
    hist_counts: np.ndarray  # [n, histogram_bins] int64
    interval_counts: np.ndarray  # [n, n_intervals] int64
    ex_feature: np.ndarray  # [E] int64
    ex_kind: np.ndarray  # [E] int8: 0 top, 1 interval
    ex_interval: np.ndarray  # [E] int64 (-1 for top examples)
    ex_rank: np.ndarray  # [E] int64
    ex_doc_index: np.ndarray  # [E] int64: index into the run's document list
    ex_doc_offset: np.ndarray  # [E] int64: token offset of the chosen token in its document
    ex_tokens: np.ndarray  # [E, context] int32
    ex_acts: np.ndarray  # [E, context] float32: this feature's activation at each token
    ex_max_act: np.ndarray  # [E] float32: activation at the chosen token
    ex_max_pos: np.ndarray  # [E] int64: the chosen token's index within the context


class CodeChunks:
    """The chunk files of a mining work folder, read one at a time."""

    def __init__(self, paths: list[Path], skip: int, first_windows: list[int] | None = None):
        self.paths, self.skip = paths, skip
        self.first_windows = first_windows  # a merge of mining parts: each chunk's first window in the whole run

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int, names: tuple[str, ...] = ("vals", "idx")) -> dict[str, torch.Tensor]:
        with safe_open(str(self.paths[i]), "pt") as f:
            out = {name: f.get_tensor(name) for name in names}
            out["first_window"] = int(f.metadata()["first_window"]) if self.first_windows is None else self.first_windows[i]
        return out

    def coo(self, chunk: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, feature, value) of every non-zero activation, rows local to the chunk, in row order."""
        vals, idx = chunk["vals"].float(), chunk["idx"].long()
        rows = torch.arange(len(vals)).unsqueeze(1).expand_as(vals)
        keep = vals > 0
        return rows[keep], idx[keep], vals[keep]


def _bottom_k_merge(
    keys: torch.Tensor, refs: torch.Tensor, new_keys: torch.Tensor, new_refs: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise: keep the k best of the running (keys, refs) and the new candidates."""
    all_keys = torch.cat([keys, new_keys], 1)
    best, where = all_keys.topk(k, dim=1, largest=largest, sorted=True)
    return best, torch.cat([refs, new_refs], 1).gather(1, where)


def compute(
    chunks: CodeChunks,
    n_latents: int,
    rows_per_window: int,
    context_size: int,
    cfg: StatsConfig,
    progress: bool = True,
    coactivation: CoactivationCounter | None = None,
) -> FeatureTables:
    """The three sweeps over the chunks (module docstring). `coactivation`: a counter fed every chunk's codes
    in sweep A (coactivation.py)."""
    bar = tqdm(total=3 * len(chunks), desc="feature statistics", unit="chunk", disable=not progress, dynamic_ncols=True)
    moments = sweep_moments(chunks, n_latents, bar, coactivation)
    chosen = sweep_choose(chunks, moments, rows_per_window, cfg, bar)
    contexts = sweep_contexts(chunks, chosen, n_latents, rows_per_window, context_size, cfg, bar)
    bar.close()
    return FeatureTables(
        positions=moments.positions,
        n_fired=moments.n_fired.numpy(),
        act_sum=moments.act_sum.numpy(),
        act_min=moments.act_min.numpy(),
        act_max=moments.act_max.numpy(),
        hist_counts=chosen.hist.view(n_latents, cfg.histogram_bins).numpy(),
        interval_counts=chosen.icount.view(n_latents, cfg.n_intervals).numpy(),
        ex_feature=chosen.feature.numpy(),
        ex_kind=chosen.kind.numpy(),
        ex_interval=chosen.interval.numpy(),
        ex_rank=chosen.rank.numpy(),
        ex_doc_index=contexts.doc_index,
        ex_doc_offset=contexts.doc_offset,
        ex_tokens=contexts.tokens,
        ex_acts=contexts.acts,
        ex_max_act=contexts.max_act,
        ex_max_pos=contexts.max_pos,
    )


# ---------------------------------------------------------------------------------------- sweep A: moments and range


@dataclass
class Moments:
    """Sweep A's result: per feature [n] the count, sum, min and max of its non-zero activations."""

    positions: int  # positions read
    n_fired: torch.Tensor  # [n] long
    act_sum: torch.Tensor  # [n] float64
    act_min: torch.Tensor  # [n] float32 (0 where the feature never fired)
    act_max: torch.Tensor  # [n] float32


def sweep_moments(chunks: CodeChunks, n: int, bar: tqdm, coactivation: CoactivationCounter | None = None) -> Moments:
    n_fired = torch.zeros(n, dtype=torch.long)
    act_sum = torch.zeros(n, dtype=torch.float64)
    act_min = torch.full((n,), float("inf"))
    act_max = torch.zeros(n)
    positions = 0
    for c in range(len(chunks)):
        chunk = chunks.load(c)
        positions += len(chunk["vals"])
        r, f, v = chunks.coo(chunk)
        if coactivation is not None:  # the same codes, read once: no second pass over the tokens
            coactivation.add(r, f)
        n_fired += torch.bincount(f, minlength=n)
        act_sum.index_add_(0, f, v.double())
        act_min.scatter_reduce_(0, f, v, "amin")
        act_max.scatter_reduce_(0, f, v, "amax")
        bar.update()
    act_min[n_fired == 0] = 0
    return Moments(positions, n_fired, act_sum, act_min, act_max)


# ---------------------------------------------------------------------------------------- sweep B: which examples


@dataclass
class Chosen:
    """Sweep B's result: per feature the histogram and interval counts (flat [n * bins], [n * intervals]), and the
    chosen examples, one entry each [E] (top examples first, then interval samples)."""

    hist: torch.Tensor
    icount: torch.Tensor
    feature: torch.Tensor  # [E] long
    kind: torch.Tensor  # [E] int8: 0 top, 1 interval
    interval: torch.Tensor  # [E] long (-1 for top examples)
    rank: torch.Tensor  # [E] long
    row: torch.Tensor  # [E] long: the chosen position's row in the whole run


class _Choice:
    """Sweep B's running state, O(n_latents): histograms, interval counts, each interval's sample (bottom-P random
    keys) and each feature's top windows (running top-N of each window's max)."""

    def __init__(self, m: Moments, rows_per_window: int, cfg: StatsConfig):
        n = len(m.n_fired)
        self.n, self.T1, self.cfg = n, rows_per_window, cfg
        B, I, P, N = cfg.histogram_bins, cfg.n_intervals, cfg.per_interval, cfg.top_n  # noqa: E741  (the paper-style names read best here)
        self.act_min = m.act_min
        self.hist = torch.zeros(n * B, dtype=torch.long)
        self.icount = torch.zeros(n * I, dtype=torch.long)
        self.span = (m.act_max - m.act_min).clamp_min(1e-30)
        self.safe_max = m.act_max.clamp_min(1e-30)
        self.res_keys = torch.full((n * I, P), float("inf"), dtype=torch.float64)
        self.res_refs = torch.full((n * I, P), -1, dtype=torch.long)
        self.top_vals = torch.zeros(n, N)
        self.top_refs = torch.full((n, N), -1, dtype=torch.long)

    def add(self, chunk: dict, r: torch.Tensor, f: torch.Tensor, v: torch.Tensor) -> None:
        """One chunk's non-zero activations (row local to the chunk, feature, value)."""
        row0 = chunk["first_window"] * self.T1
        group = self.count(f, v)
        self.sample_intervals(group, r, v, row0, int(chunk["first_window"]))
        self.top_windows(r, f, v, row0, len(chunk["vals"]) // self.T1)

    def count(self, f: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Add to the histograms and interval counts; returns each activation's (feature, interval) group."""
        n, B, I = self.n, self.cfg.histogram_bins, self.cfg.n_intervals  # noqa: E741
        self.hist += torch.bincount(f * B + ((v - self.act_min[f]) / self.span[f] * B).long().clamp(0, B - 1), minlength=n * B)
        group = f * I + (v / self.safe_max[f] * I).long().clamp(0, I - 1)
        self.icount += torch.bincount(group, minlength=n * I)
        return group

    def sample_intervals(self, group: torch.Tensor, r: torch.Tensor, v: torch.Tensor, row0: int, first_window: int) -> None:
        """Each group's P smallest random keys of this chunk, merged into the running bottom-P (reservoir sampling)."""
        n, I, P = self.n, self.cfg.n_intervals, self.cfg.per_interval  # noqa: E741
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + first_window)
        u = torch.rand(len(v), generator=gen, dtype=torch.float64)
        order = torch.argsort(group.double() + u)  # by group, then by random key
        g_sorted = group[order]
        rank = torch.arange(len(order)) - torch.searchsorted(g_sorted, g_sorted)
        keep = rank < P
        cand_keys = torch.full((n * I, P), float("inf"), dtype=torch.float64)
        cand_refs = torch.full((n * I, P), -1, dtype=torch.long)
        cand_keys[g_sorted[keep], rank[keep]] = u[order][keep]
        cand_refs[g_sorted[keep], rank[keep]] = row0 + r[order][keep]
        self.res_keys, self.res_refs = _bottom_k_merge(self.res_keys, self.res_refs, cand_keys, cand_refs, P, largest=False)

    def top_windows(self, r: torch.Tensor, f: torch.Tensor, v: torch.Tensor, row0: int, n_win: int) -> None:
        """Each feature's max in each window of this chunk (at its last row), merged into the running top-N."""
        n, T1 = self.n, self.T1
        key = (r // T1) * n + f
        wmax = torch.zeros(n_win * n).scatter_reduce_(0, key, v, "amax")
        at_max = v == wmax[key]
        wrow = torch.full((n_win * n,), -1, dtype=torch.long).scatter_reduce_(0, key[at_max], row0 + r[at_max], "amax")
        self.top_vals, self.top_refs = _bottom_k_merge(
            self.top_vals, self.top_refs, wmax.view(n_win, n).T, wrow.view(n_win, n).T, self.cfg.top_n, largest=True
        )

    def result(self) -> Chosen:
        """The chosen examples: every feature's top windows that fired, then every interval's samples."""
        n, I, P, N = self.n, self.cfg.n_intervals, self.cfg.per_interval, self.cfg.top_n  # noqa: E741
        top_ok = self.top_vals > 0
        res_ok = self.res_refs >= 0
        feat_top = torch.arange(n).unsqueeze(1).expand(n, N)[top_ok]
        ranks_top = torch.arange(N).expand(n, N)[top_ok]
        gi = torch.arange(n * I).unsqueeze(1).expand(n * I, P)[res_ok]
        return Chosen(
            hist=self.hist,
            icount=self.icount,
            feature=torch.cat([feat_top, gi // I]),
            kind=torch.cat([torch.zeros(len(feat_top), dtype=torch.int8), torch.ones(len(gi), dtype=torch.int8)]),
            interval=torch.cat([torch.full((len(feat_top),), -1), gi % I]),
            rank=torch.cat([ranks_top, torch.arange(P).expand(n * I, P)[res_ok]]),
            row=torch.cat([self.top_refs[top_ok], self.res_refs[res_ok]]),
        )


def sweep_choose(chunks: CodeChunks, m: Moments, rows_per_window: int, cfg: StatsConfig, bar: tqdm) -> Chosen:
    """Sweep B: with each feature's range known, the histograms and interval counts, and the examples to show."""
    choice = _Choice(m, rows_per_window, cfg)
    for c in range(len(chunks)):
        chunk = chunks.load(c)
        choice.add(chunk, *chunks.coo(chunk))
        bar.update()
    return choice.result()


# ---------------------------------------------------------------------------------------- sweep C: the examples' contexts


@dataclass
class Contexts:
    """Sweep C's result, per chosen example [E] (in `Chosen` order): its token window and this feature's activations."""

    tokens: np.ndarray  # [E, C] int32
    acts: np.ndarray  # [E, C] float32
    doc_index: np.ndarray  # [E] int64
    doc_offset: np.ndarray  # [E] int64
    max_act: np.ndarray  # [E] float32
    max_pos: np.ndarray  # [E] int64

    @classmethod
    def empty(cls, E: int, C: int) -> Contexts:
        z = np.zeros
        return cls(z((E, C), np.int32), z((E, C), np.float32), z(E, np.int64), z(E, np.int64), z(E, np.float32), z(E, np.int64))


def sweep_contexts(
    chunks: CodeChunks, chosen: Chosen, n: int, rows_per_window: int, context_size: int, cfg: StatsConfig, bar: tqdm
) -> Contexts:
    """Sweep C: read each chunk once and fill in the contexts of the examples whose rows it holds."""
    T1 = rows_per_window
    C = min(cfg.context_before + 1 + cfg.context_after, context_size)
    out = Contexts.empty(len(chosen.row), C)
    order = torch.argsort(chosen.row)
    sorted_rows = chosen.row[order]
    for c in range(len(chunks)):
        chunk = chunks.load(c, names=("vals", "idx", "tokens", "doc_index", "doc_offset"))
        row0, n_rows = chunk["first_window"] * T1, len(chunk["vals"])
        lo, hi = torch.searchsorted(sorted_rows, torch.tensor([row0, row0 + n_rows])).tolist()
        bar.update()
        if lo != hi:
            _fill_contexts(out, chunks, chunk, chosen, order[lo:hi], n, T1, context_size, cfg.context_before)
    return out


def _fill_contexts(
    out: Contexts,
    chunks: CodeChunks,
    chunk: dict,
    chosen: Chosen,
    sel: torch.Tensor,
    n: int,
    T1: int,
    context_size: int,
    before: int,
) -> None:
    """The examples `sel` (all in this chunk): tokens around the chosen position, the feature's activation at each
    (looked up in the chunk's codes, 0 at sink positions), and where in which document the position is."""
    C, skip = out.tokens.shape[1], chunks.skip
    local = chosen.row[sel] - chunk["first_window"] * T1
    feat = chosen.feature[sel]
    w, pos = local // T1, local % T1 + skip  # window in chunk, position in window
    start = (pos - before).clamp(0, context_size - C)
    cols = start.unsqueeze(1) + torch.arange(C)  # [m, C] positions in the window
    at_sel = sel.numpy()
    out.tokens[at_sel] = chunk["tokens"][w.unsqueeze(1), cols].numpy()
    acts = _activations_at(chunks, chunk, w, cols, feat, n, T1)
    out.acts[at_sel] = acts.numpy()
    out.max_pos[at_sel] = (pos - start).numpy()
    out.max_act[at_sel] = acts.gather(1, (pos - start).unsqueeze(1)).squeeze(1).numpy()
    out.doc_index[at_sel] = chunk["doc_index"][w, pos].numpy()
    out.doc_offset[at_sel] = chunk["doc_offset"][w, pos].numpy()


def _activations_at(
    chunks: CodeChunks, chunk: dict, w: torch.Tensor, cols: torch.Tensor, feat: torch.Tensor, n: int, T1: int
) -> torch.Tensor:
    """[m, C]: feature feat[i]'s activation at positions cols[i] of window w[i] of this chunk, looked up in the
    chunk's sparse codes (0 where it did not fire, and at sink positions, which hold no code)."""
    skip = chunks.skip
    r, f, v = chunks.coo(chunk)
    coo_key = r * n + f  # rows ascending, so sort only within rows
    coo_key, perm = coo_key.sort()
    v = v[perm]
    q_row = w.unsqueeze(1) * T1 + (cols - skip)
    q_key = q_row * n + feat.unsqueeze(1)
    at = torch.searchsorted(coo_key, q_key).clamp(max=len(coo_key) - 1)
    hit = (coo_key[at] == q_key) & (cols >= skip)
    return torch.where(hit, v[at], torch.zeros(()))
