"""The BatchTopK autoencoder of Bussmann et al. 2024, with a sparse backward pass like TopK's.

    train:   z = the k * batch largest positive pre-activations W_enc (x - b_pre) + b_enc of the
             whole batch (a position may hold more or fewer than k), 0 elsewhere
    infer:   z = pre * (pre > theta), theta a global threshold estimated while training: a running
             average (rate threshold_lr) of the smallest activation BatchTopK kept, as SAELens does, but
             started at the first batch's value rather than at 0
    decode:  x_hat = W_dec^T z + b_pre                (unit-norm decoder rows)
    loss:    FVU(x, x_hat) + AuxK over dead latents (as TopK's)

The batch-wide selection never holds the [batch, n_latents] pre-activations: each block of rows keeps
its CANDIDATES * k largest, the k * batch largest are chosen among those, and a row whose every candidate
was chosen (it might hold more) is encoded again in full, so the selection is exact. The gradients then
run over the chosen entries only (sparse.CodePattern). Matryoshka (matryoshka.py) is this SAE with
nested prefixes of the dictionary, each decoded and scored on its own: `prefix_sizes`.

Saved (interchange.py) as SAELens saves it after training: a "jumprelu" SAE whose every latent's
threshold is theta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SaescopeError
from .base import DictionarySAE, GemmKind, GroupSum, StepLosses, bf16_gemm, encode_block_rows, gemm_operand
from .reductions import ordered_sum, weighted_row_sum
from .sparse import CodePattern, auxk_grads
from .topk import require_unit_decoder, variance_sum

CANDIDATES = 4  # per row and block: CANDIDATES * k largest pre-activations are kept for the batch-wide choice


@dataclass
class BatchTopKConfig:
    """Architecture and loss settings of a BatchTopK SAE."""

    d_in: int
    n_latents: int = 16384
    k: float = 32  # active latents per position, on average over the batch
    k_aux: int | None = None  # AuxK: dead latents used to model the residual (default d_in // 2)
    aux_coef: float = 1 / 32  # AuxK loss weight
    threshold_lr: float = 0.01  # rate of the running average that estimates the inference threshold

    def __post_init__(self) -> None:
        if self.k_aux is None:
            self.k_aux = self.d_in // 2
        if not 0 < self.k < self.n_latents:
            raise SaescopeError(f"k must be between 0 and n_latents (got k={self.k}, n_latents={self.n_latents})")
        if not 0 < self.threshold_lr <= 1:
            raise SaescopeError(f"threshold_lr must be in (0, 1] (got {self.threshold_lr})")


class BatchTopKSAE(DictionarySAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"  # SAELens saves a trained BatchTopK SAE as a JumpReLU one (one threshold)
    imports_from = {"saelens": ("batchtopk",)}  # SAELens' training folders
    threshold: torch.Tensor

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # float64 like SAELens: a running average of small values over many steps
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def prefix_sizes(self) -> list[int]:
        """The nested dictionaries each scored on its own (Matryoshka); plain BatchTopK: the whole one."""
        return [self.cfg.n_latents]

    @classmethod
    def k_setting(cls, k: float) -> float:
        return k  # a mean over the batch: may be fractional

    @classmethod
    def saelens_import_settings(cls, cfg: dict, w: dict[str, torch.Tensor], where: str | Path) -> dict:
        require_unit_decoder(cfg, w, where)
        return {}

    def load_thresholds(self, w: dict[str, torch.Tensor], where: str | Path) -> None:
        threshold = self.saved_threshold(w, where)  # SAELens' training folders call it topk_threshold
        if not bool((threshold == threshold[0]).all()):
            raise SaescopeError(f"{where}: a {self.architecture} SAE has one threshold for every latent; these differ")
        self.threshold.fill_(float(threshold[0]))

    # ------------------------------------------------------------------ inference

    def activation_thresholds(self) -> torch.Tensor:
        return self.threshold.to(self.W_enc.dtype).expand(self.cfg.n_latents)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_pre) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense codes at inference: the pre-activations above the estimated threshold (and above 0)."""
        pre = self.pre_activations(x)
        return pre * (pre > self.activation_thresholds().clamp_min(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x) @ self.W_dec + self.b_pre

    # ------------------------------------------------------------------ training

    def _select(
        self, xg: torch.Tensor, W_T: torch.Tensor, bias: torch.Tensor, operand: GemmKind, dead_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the batch's k * B largest positive pre-activations sorted by (row, col),
        and the dead columns' pre-activations [B, n_dead] for AuxK."""
        B, n = len(xg), self.cfg.n_latents
        n_keep = int(self.cfg.k * B)  # SAELens' count: int(k * positions)
        per_row = min(n, CANDIDATES * math.ceil(self.cfg.k))
        pre_dead = torch.empty(B, len(dead_idx), dtype=W_T.dtype, device=xg.device) if len(dead_idx) else xg.new_empty(0, 0)

        def block_pre(rows: torch.Tensor) -> torch.Tensor:
            block = torch.addmm(bias, rows, W_T)
            if operand == "rounded":
                block.copy_(block.bfloat16())
            return block

        val_parts, col_parts = [], []
        step = encode_block_rows(xg.device.type, n)
        for s in range(0, B, step):  # blocks as TopK's: each is chosen from while it is still in cache
            block = block_pre(xg[s : s + step])
            v, i = block.topk(per_row, dim=1, sorted=False)
            val_parts.append(v.float())
            col_parts.append(i)
            if len(dead_idx):
                torch.index_select(block, 1, dead_idx, out=pre_dead[s : s + len(block)])
        cand_vals, cand_cols = torch.cat(val_parts), torch.cat(col_parts)
        cand_rows = torch.arange(B, device=xg.device).unsqueeze(1).expand(B, per_row)
        chosen = cand_vals.reshape(-1).topk(n_keep, sorted=False).values.min()
        saturated = (cand_vals.min(1).values >= chosen).nonzero().squeeze(1) if per_row < n else cand_rows.new_zeros(0)
        flat_vals, flat_rows, flat_cols = cand_vals.reshape(-1), cand_rows.reshape(-1), cand_cols.reshape(-1)
        if len(saturated):  # these rows may hold more than their candidates: take them whole
            keep = torch.ones(B, dtype=torch.bool, device=xg.device).index_fill_(0, saturated, False)
            full = block_pre(xg[saturated]).float()
            flat_vals = torch.cat([cand_vals[keep].reshape(-1), full.reshape(-1)])
            flat_rows = torch.cat([cand_rows[keep].reshape(-1), saturated.repeat_interleave(n)])
            flat_cols = torch.cat([cand_cols[keep].reshape(-1), torch.arange(n, device=xg.device).repeat(len(saturated))])
        top_vals, top_pos = flat_vals.topk(n_keep, sorted=False)
        positive = top_vals > 0
        top_vals, top_pos = top_vals[positive], top_pos[positive]
        rows, cols = flat_rows[top_pos], flat_cols[top_pos]
        order = (rows * n + cols).argsort()
        return rows[order], cols[order], top_vals[order], pre_dead

    @torch.no_grad()
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """The TopKSAE.loss_and_grads contract: set every parameter's .grad for batch x and report loss, fvu,
        aux_fvu, l0, n_dead and `fired`. Also moves the inference threshold towards this batch's smallest kept
        activation. Data parallel (`group_sum`): each rank chooses k * its rows among its own rows (as SAELens
        under DDP), and the threshold moves by the ranks' mean of their smallest."""
        cfg, n = self.cfg, self.cfg.n_latents
        B = len(x)
        for p in self.parameters():
            p.grad = None
        xc = x - self.b_pre
        operand = bf16_gemm(autocast_bf16, x.device.type)
        W_T, bias, xg = gemm_operand(self.W_enc, operand).T, gemm_operand(self.b_enc, operand), gemm_operand(xc, operand)
        dead_idx = dead.nonzero().squeeze(1) if cfg.aux_coef else dead.new_zeros(0, dtype=torch.long)
        rows, cols, z, pre_dead = self._select(xg, W_T, bias, operand, dead_idx)

        # level j of the prefixes holds latents [sizes[j-1], sizes[j]); an entry counts towards its level's
        # reconstruction and every larger one. Decoding on rows (level, position) gives each level's own part.
        sizes = self.prefix_sizes()
        levels = len(sizes)
        level = torch.bucketize(cols, torch.tensor(sizes[:-1], device=x.device), right=True) if levels > 1 else None
        pattern = CodePattern(rows if level is None else level * B + rows, cols, levels * B, n, row_sorted=level is None)
        parts = pattern.decode(z, self.W_dec).view(levels, B, -1)
        x_hats = parts.cumsum(0) + self.b_pre if levels > 1 else parts + self.b_pre  # [levels, B, d]
        denom = variance_sum(x, group_sum)
        errs = x - x_hats
        terms = torch.stack([ordered_sum(e.pow(2)) for e in errs]) / denom
        residual = errs[-1].clone()  # the whole dictionary's error: AuxK's target
        g = errs.mul_(-2.0 / denom)  # dLoss/dx_hat of each level's term
        g_total = g.flip(0).cumsum(0).flip(0) if levels > 1 else g  # an entry of level j feeds terms j..last
        g_flat = g_total.reshape(levels * B, -1)
        gz = pattern.sampled(g_flat, self.W_dec)  # dLoss/dz (= dLoss/dpre: every chosen entry is positive)
        gW_dec = pattern.per_col(z, g_flat)
        xc_levels = xc if levels == 1 else xc.repeat(levels, 1)  # fp32, as TopK's: CSR products have no bf16 on a CPU
        gW_enc = pattern.per_col(gz, xc_levels)
        gb_enc = pattern.col_sum(gz)
        loss = terms.sum()
        aux_fvu = x.new_zeros(())
        if len(dead_idx):
            aux_loss, aux_fvu = auxk_grads(
                self, pre_dead, dead_idx, residual, xg, (gW_enc, gW_dec, gb_enc), operand, variance_sum(residual, group_sum)
            )
            loss = loss + aux_loss
        gb_pre = g_total[0].sum(0) - weighted_row_sum(gb_enc, self.W_enc)  # b_pre also enters as (x - b_pre)
        self.W_enc.grad, self.W_dec.grad, self.b_enc.grad, self.b_pre.grad = gW_enc, gW_dec, gb_enc, gb_pre
        self._update_threshold(z, group_sum)
        fired = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill_(0, cols, True)
        loss_f, fvu, aux = torch.stack([loss, terms[-1], aux_fvu]).tolist()
        return StepLosses(loss=loss_f, fvu=fvu, aux_fvu=aux, l0=len(z) / B, n_dead=len(dead_idx), fired=fired)

    def _update_threshold(self, z: torch.Tensor, group_sum: GroupSum | None) -> None:
        smallest = z.min().double() if len(z) else self.threshold.clone()  # no entry chosen: the threshold stays
        if group_sum is not None:
            smallest = group_sum(smallest.reshape(1)) / group_sum(torch.ones(1, dtype=torch.float64, device=z.device))
        # the first step sets it (a running average started from 0 would take ~1/threshold_lr steps to forget it)
        self.threshold.lerp_(smallest.reshape(()), self.cfg.threshold_lr if bool(self.threshold > 0) else 1.0)
