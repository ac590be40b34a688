"""Sparse products shared by the architectures whose codes hold a varying number of latents per position
(BatchTopK, Matryoshka, JumpReLU), and the AuxK term they share with TopK.

A training step's code is a [rows, n_latents] matrix with few entries per row. Its reconstruction is a
CSR @ dense product, the gradient of each entry is one sampled dot product <dL/dx_hat[row], W_dec[latent]>,
and the weight gradients are (n_latents x rows) CSR @ (rows x d) products: the same idea as TopK's
hand-written backward (topk.py), for patterns whose rows differ in length.
"""

from __future__ import annotations

import torch

from .base import DictionarySAE, GemmKind, gemm, gemm_operand
from .reductions import ordered_sum


class CodePattern:
    """The entries (rows[e], cols[e]) of a [n_rows, n_cols] matrix, in any order; every method takes and
    returns per-entry values in that order. `row_sorted`: the entries are already sorted by (row, col)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, row_sorted: bool = False):
        self.n_rows, self.n_cols, self.nnz = n_rows, n_cols, len(rows)
        self.by_row = None if row_sorted else (rows * n_cols + cols).argsort()  # CSR wants rows, then columns, in order
        self.row_cols = cols if self.by_row is None else cols[self.by_row]
        self.row_crow = self._crow(rows, n_rows)
        self.by_col = cols.argsort(stable=True)
        self.col_rows = rows[self.by_col]
        self.col_crow = self._crow(cols, n_cols)

    @staticmethod
    def _crow(index: torch.Tensor, size: int) -> torch.Tensor:
        # counts by scatter_add: bincount would wait for a GPU (it sizes its output from the max)
        counts = torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def _row_values(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.by_row is None else values[self.by_row]

    def rows_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The [n_rows, n_cols] CSR matrix holding `values` at the entries."""
        return torch.sparse_csr_tensor(self.row_crow, self.row_cols, self._row_values(values), (self.n_rows, self.n_cols))

    def decode(self, values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """sum over each row's entries of value * W[col]: [n_rows, d]."""
        if self.nnz == 0:
            return W.new_zeros(self.n_rows, W.shape[1])
        return self.rows_matrix(values.to(W.dtype)) @ W

    def sampled(self, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """<g[row], W[col]> for every entry: [nnz]."""
        if self.nnz == 0:
            return g.new_zeros(0)
        pattern = self.rows_matrix(torch.zeros(self.nnz, dtype=g.dtype, device=g.device))
        out = torch.sparse.sampled_addmm(pattern, g, W.T, beta=0).values()
        if self.by_row is None:
            return out
        return torch.empty_like(out).index_copy_(0, self.by_row, out)

    def per_col(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """sum over each column's entries of value * dense[row]: [n_cols, d]."""
        if self.nnz == 0:
            return dense.new_zeros(self.n_cols, dense.shape[1])
        csr = torch.sparse_csr_tensor(self.col_crow, self.col_rows, values[self.by_col].to(dense.dtype), (self.n_cols, self.n_rows))
        return csr @ dense

    def col_sum(self, values: torch.Tensor) -> torch.Tensor:
        """sum of each column's entries: [n_cols]."""
        return values.new_zeros(self.n_cols).index_add_(0, self.row_cols, self._row_values(values))


def auxk_grads(
    sae: DictionarySAE,
    pre_dead: torch.Tensor,
    dead_idx: torch.Tensor,
    residual: torch.Tensor,
    xg: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    operand: GemmKind,
    e_var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK (Gao et al. 2024) over the dead latents: decode, without b_pre, the top k_aux pre-activations
    among the dead columns `pre_dead` [B, n_dead] to model `residual` (x - x_hat, no gradient into it); add
    its gradients to grads = (W_enc, W_dec, b_enc) in place; return (its weighted loss, its normalised error), device scalars.
    The products run over the dead columns only, in the encoder GEMM's dtype (`operand`, base.bf16_gemm)."""
    cfg = sae.cfg
    gW_enc, gW_dec, gb_enc = grads
    n_dead = len(dead_idx)
    aux_vals, aux_local = pre_dead.topk(min(cfg.k_aux, n_dead), dim=1, sorted=False)
    Z = torch.zeros(pre_dead.shape, dtype=aux_vals.dtype, device=pre_dead.device).scatter_(1, aux_local, aux_vals.relu())
    W_dead = gemm_operand(sae.W_dec[dead_idx], operand)
    aux_err = residual - gemm(Z, W_dead, operand)
    aux_fvu = ordered_sum(aux_err.pow(2)) / e_var
    scale = cfg.aux_coef * min(n_dead / cfg.k_aux, 1.0)
    g_aux = gemm_operand(aux_err.mul_(-2.0 * scale / e_var), operand)  # dLoss/de_hat
    gW_dec.index_add_(0, dead_idx, gemm(Z.T, g_aux, operand).float())
    gz = torch.gather(gemm(g_aux, W_dead.T, operand), 1, aux_local) * (aux_vals > 0)
    G = Z.zero_().scatter_(1, aux_local, gz)
    gW_enc.index_add_(0, dead_idx, gemm(G.T, xg, operand).float())
    gb_enc.index_add_(0, dead_idx, G.sum(0, dtype=torch.float32))
    return scale * aux_fvu, aux_fvu
