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

    def load(self, i: int, names=("vals", "idx")) -> dict[str, torch.Tensor]:
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


def _bottom_k_merge(keys: torch.Tensor, refs: torch.Tensor, new_keys: torch.Tensor, new_refs: torch.Tensor, k: int, largest: bool):
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
    """`coactivation`: a counter fed every chunk's codes in sweep A (coactivation.py)."""
    n, T1, skip = n_latents, rows_per_window, chunks.skip
    bar = tqdm(total=3 * len(chunks), desc="feature statistics", unit="chunk", disable=not progress, dynamic_ncols=True)

    # ---- sweep A: moments and range
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

    # ---- sweep B: histogram, intervals with their samples, top windows
    B, I, P, N = cfg.histogram_bins, cfg.n_intervals, cfg.per_interval, cfg.top_n  # noqa: E741  (the paper-style names read best here)
    hist = torch.zeros(n * B, dtype=torch.long)
    icount = torch.zeros(n * I, dtype=torch.long)
    span = (act_max - act_min).clamp_min(1e-30)
    safe_max = act_max.clamp_min(1e-30)
    res_keys = torch.full((n * I, P), float("inf"), dtype=torch.float64)
    res_refs = torch.full((n * I, P), -1, dtype=torch.long)
    top_vals = torch.zeros(n, N)
    top_refs = torch.full((n, N), -1, dtype=torch.long)
    for c in range(len(chunks)):
        chunk = chunks.load(c)
        r, f, v = chunks.coo(chunk)
        row0 = chunk["first_window"] * T1
        hist += torch.bincount(f * B + ((v - act_min[f]) / span[f] * B).long().clamp(0, B - 1), minlength=n * B)
        group = f * I + (v / safe_max[f] * I).long().clamp(0, I - 1)
        icount += torch.bincount(group, minlength=n * I)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(chunk["first_window"]))
        u = torch.rand(len(v), generator=gen, dtype=torch.float64)
        order = torch.argsort(group.double() + u)  # by group, then by random key
        g_sorted = group[order]
        rank = torch.arange(len(order)) - torch.searchsorted(g_sorted, g_sorted)
        keep = rank < P
        cand_keys = torch.full((n * I, P), float("inf"), dtype=torch.float64)
        cand_refs = torch.full((n * I, P), -1, dtype=torch.long)
        cand_keys[g_sorted[keep], rank[keep]] = u[order][keep]
        cand_refs[g_sorted[keep], rank[keep]] = row0 + r[order][keep]
        res_keys, res_refs = _bottom_k_merge(res_keys, res_refs, cand_keys, cand_refs, P, largest=False)

        n_win = len(chunk["vals"]) // T1
        key = (r // T1) * n + f
        wmax = torch.zeros(n_win * n).scatter_reduce_(0, key, v, "amax")
        at_max = v == wmax[key]
        wrow = torch.full((n_win * n,), -1, dtype=torch.long).scatter_reduce_(0, key[at_max], row0 + r[at_max], "amax")
        top_vals, top_refs = _bottom_k_merge(top_vals, top_refs, wmax.view(n_win, n).T, wrow.view(n_win, n).T, N, largest=True)
        bar.update()

    # ---- sweep C: contexts of the chosen examples
    top_ok = top_vals > 0
    res_ok = res_refs >= 0
    feat_top = torch.arange(n).unsqueeze(1).expand(n, N)[top_ok]
    ranks_top = torch.arange(N).expand(n, N)[top_ok]
    gi = torch.arange(n * I).unsqueeze(1).expand(n * I, P)[res_ok]
    ex_feature = torch.cat([feat_top, gi // I])
    ex_kind = torch.cat([torch.zeros(len(feat_top), dtype=torch.int8), torch.ones(len(gi), dtype=torch.int8)])
    ex_interval = torch.cat([torch.full((len(feat_top),), -1), gi % I])
    ex_rank = torch.cat([ranks_top, torch.arange(P).expand(n * I, P)[res_ok]])
    ex_row = torch.cat([top_refs[top_ok], res_refs[res_ok]])
    E, C = len(ex_row), cfg.context_before + 1 + cfg.context_after
    C = min(C, context_size)
    ex_tokens = np.zeros((E, C), np.int32)
    ex_acts = np.zeros((E, C), np.float32)
    ex_doc_index = np.zeros(E, np.int64)
    ex_doc_offset = np.zeros(E, np.int64)
    ex_max_act = np.zeros(E, np.float32)
    ex_max_pos = np.zeros(E, np.int64)
    order = torch.argsort(ex_row)
    sorted_rows = ex_row[order]
    for c in range(len(chunks)):
        chunk = chunks.load(c, names=("vals", "idx", "tokens", "doc_index", "doc_offset"))
        row0, n_rows = chunk["first_window"] * T1, len(chunk["vals"])
        lo, hi = torch.searchsorted(sorted_rows, torch.tensor([row0, row0 + n_rows])).tolist()
        bar.update()
        if lo == hi:
            continue
        sel = order[lo:hi]
        local = ex_row[sel] - row0
        feat = ex_feature[sel]
        w, pos = local // T1, local % T1 + skip  # window in chunk, position in window
        start = (pos - cfg.context_before).clamp(0, context_size - C)
        cols = start.unsqueeze(1) + torch.arange(C)  # [m, C] positions in the window
        ex_tokens[sel.numpy()] = chunk["tokens"][w.unsqueeze(1), cols].numpy()
        r, f, v = chunks.coo(chunk)
        coo_key = r * n + f  # rows ascending, so sort only within rows
        coo_key, perm = coo_key.sort()
        v = v[perm]
        q_row = w.unsqueeze(1) * T1 + (cols - skip)
        q_key = q_row * n + feat.unsqueeze(1)
        at = torch.searchsorted(coo_key, q_key).clamp(max=len(coo_key) - 1)
        hit = (coo_key[at] == q_key) & (cols >= skip)
        acts = torch.where(hit, v[at], torch.zeros(()))
        ex_acts[sel.numpy()] = acts.numpy()
        ex_max_pos[sel.numpy()] = (pos - start).numpy()
        ex_max_act[sel.numpy()] = acts.gather(1, (pos - start).unsqueeze(1)).squeeze(1).numpy()
        ex_doc_index[sel.numpy()] = chunk["doc_index"][w, pos].numpy()
        ex_doc_offset[sel.numpy()] = chunk["doc_offset"][w, pos].numpy()
    bar.close()
    return FeatureTables(
        positions=positions,
        n_fired=n_fired.numpy(),
        act_sum=act_sum.numpy(),
        act_min=act_min.numpy(),
        act_max=act_max.numpy(),
        hist_counts=hist.view(n, B).numpy(),
        interval_counts=icount.view(n, I).numpy(),
        ex_feature=ex_feature.numpy(),
        ex_kind=ex_kind.numpy(),
        ex_interval=ex_interval.numpy(),
        ex_rank=ex_rank.numpy(),
        ex_doc_index=ex_doc_index,
        ex_doc_offset=ex_doc_offset,
        ex_tokens=ex_tokens,
        ex_acts=ex_acts,
        ex_max_act=ex_max_act,
        ex_max_pos=ex_max_pos,
    )
