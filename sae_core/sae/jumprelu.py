"""The JumpReLU autoencoder of Rajamanoharan et al. 2024 (the Gemma Scope SAEs), with a sparse backward pass.

    encode:  z_i = pre_i * H(pre_i - theta_i),   pre = W_enc (x - b_pre) + b_enc,  theta = exp(log_threshold)
    decode:  x_hat = W_dec^T z + b_pre                (unit-norm decoder rows)
    loss:    FVU(x, x_hat) + lambda_t * mean over positions of ||z||_0
             lambda_t = l0_coef * min(1, step / l0_warmup_steps): the penalty's linear warm-up

The Heaviside step H has no useful gradient, so the threshold learns through straight-through estimators
with a rectangle kernel K of width `bandwidth` (eps): d z_i / d theta_i = -(theta_i / eps) K((pre_i - theta_i) / eps)
and d H / d theta_i = -(1 / eps) K(...) (the paper's eqs. 11 and 12); the gradient of pre passes where z_i
is active. Only entries above theta - eps/2 take part in any gradient, so once training has made the codes
sparse the products run over those entries (sparse.CodePattern); while more than DENSE_ABOVE of a step's
first block is there (early training: theta starts near 0) the step uses dense products instead.

Saved (interchange.py) as SAELens' "jumprelu", with `threshold` = exp(log_threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SaescopeError
from .base import DictionarySAE, GroupSum, StepLosses, bf16_gemm, encode_block_rows, gemm, gemm_operand
from .reductions import ordered_sum, weighted_row_sum
from .sparse import CodePattern
from .topk import variance_sum


@dataclass
class JumpReLUConfig:
    """Architecture and loss settings of a JumpReLU SAE (defaults: the paper's, for unit mean squared norm inputs)."""

    d_in: int
    n_latents: int = 16384
    l0_coef: float = 1e-3  # lambda: larger gives lower L0 and higher FVU
    l0_warmup_steps: int = 0  # steps over which lambda grows linearly from 0 (the paper: the first 10k)
    bandwidth: float = 1e-3  # eps, the rectangle kernel's width in the threshold's straight-through estimator
    init_threshold: float = 1e-3  # every latent's threshold at the start

    def __post_init__(self) -> None:
        if self.l0_coef < 0 or self.l0_warmup_steps < 0:
            raise SaescopeError(f"l0_coef and l0_warmup_steps must be >= 0 (got {self.l0_coef}, {self.l0_warmup_steps})")
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise SaescopeError(f"bandwidth and init_threshold must be positive (got {self.bandwidth}, {self.init_threshold})")


class JumpReLUSAE(DictionarySAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    imports_from = {"saelens": ("jumprelu",)}
    DENSE_ABOVE = 1 / 32  # fraction of a block's entries taking part above which dense products are faster (2-core CPU)

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_latents,), math.log(cfg.init_threshold)))
        self.l0_coef_now = cfg.l0_coef if not cfg.l0_warmup_steps else 0.0

    def begin_step(self, step: int) -> None:
        warmup = self.cfg.l0_warmup_steps
        self.l0_coef_now = self.cfg.l0_coef * (min(1.0, step / warmup) if warmup else 1.0)

    # ------------------------------------------------------------------ inference

    def activation_thresholds(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def load_thresholds(self, w: dict[str, torch.Tensor], where: str | Path) -> None:
        # a threshold <= 0 fires above 0, as SAELens' ReLU before its mask does
        threshold = self.saved_threshold(w, where)
        if threshold.shape != (self.cfg.n_latents,):
            raise SaescopeError(f"{where}: threshold has shape {tuple(threshold.shape)}, expected ({self.cfg.n_latents},)")
        with torch.no_grad():
            self.log_threshold.copy_(threshold.clamp_min(0).log().float())

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_pre) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre * (pre > self.activation_thresholds())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x) @ self.W_dec + self.b_pre

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """The TopKSAE.loss_and_grads contract (aux_fvu is 0: JumpReLU has no AuxK). Data parallel
        (`group_sum`): the L0 penalty is this rank's share of the global batch's mean."""
        cfg, n = self.cfg, self.cfg.n_latents
        B = len(x)
        for p in self.parameters():
            p.grad = None
        operand = bf16_gemm(autocast_bf16, x.device.type)
        xc = x - self.b_pre
        W_T, bias, xg = gemm_operand(self.W_enc, operand).T, gemm_operand(self.b_enc, operand), gemm_operand(xc, operand)
        theta = self.log_threshold.exp()
        lower = theta - cfg.bandwidth / 2  # entries above it are active or inside the kernel's window
        n_global = float(B if group_sum is None else group_sum(torch.tensor([float(B)], device=x.device)).item())
        lam, eps = self.l0_coef_now, cfg.bandwidth
        denom = variance_sum(x, group_sum)

        def block_pre(rows: torch.Tensor) -> torch.Tensor:
            block = torch.addmm(bias, rows, W_T)
            return block.bfloat16().float() if operand is not None else block

        step = encode_block_rows(x.device.type, n)
        first = block_pre(xg[:step])
        if (first > lower).float().mean().item() > self.DENSE_ABOVE:
            pre = torch.cat([first] + [block_pre(xg[s : s + step]) for s in range(step, B, step)])
            active = pre > theta
            z = pre * active
            err = x - (z @ self.W_dec + self.b_pre)
            fvu = ordered_sum(err.pow(2)) / denom
            g = err.mul_(-2.0 / denom)
            gz = g @ self.W_dec.T  # dLoss/dz, [B, n]
            window = (pre - theta).abs() < eps / 2
            g_theta = torch.where(window, -(theta / eps) * gz - lam / (eps * n_global), 0.0).sum(0)
            dpre = gz.mul_(active)
            gW_enc = gemm(gemm_operand(dpre, operand).T, xg, operand).float()
            gW_dec = z.T @ g
            gb_enc = dpre.sum(0)
            n_active = active.sum()
            fired = active.any(0)
        else:
            rows_, cols_, vals_ = [], [], []
            for s in range(0, B, step):
                block = first if s == 0 else block_pre(xg[s : s + step])
                r, c = (block > lower).nonzero(as_tuple=True)  # row-major: sorted by (row, col)
                rows_.append(r + s)
                cols_.append(c)
                vals_.append(block[r, c].float())
            rows, cols, vals = torch.cat(rows_), torch.cat(cols_), torch.cat(vals_)
            pattern = CodePattern(rows, cols, B, n, row_sorted=True)
            t = theta[cols]
            active = vals > t
            z = vals * active
            err = x - (pattern.decode(z, self.W_dec) + self.b_pre)
            fvu = ordered_sum(err.pow(2)) / denom
            g = err.mul_(-2.0 / denom)
            gz = pattern.sampled(g, self.W_dec)
            window = (vals - t).abs() < eps / 2
            g_theta = pattern.col_sum(torch.where(window, -(t / eps) * gz - lam / (eps * n_global), 0.0))
            dpre = gz * active
            gW_enc = pattern.per_col(dpre, xc)  # fp32, as TopK's: CSR products have no bf16 on a CPU
            gW_dec = pattern.per_col(z, g)
            gb_enc = pattern.col_sum(dpre)
            n_active = active.sum()
            fired = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill_(0, cols[active], True)
        l0_term = n_active / n_global
        loss = fvu + lam * l0_term
        self.log_threshold.grad = g_theta * theta  # d/dlog(theta) = theta * d/dtheta
        self.W_enc.grad, self.W_dec.grad, self.b_enc.grad = gW_enc, gW_dec, gb_enc
        self.b_pre.grad = g.sum(0) - weighted_row_sum(gb_enc, self.W_enc)  # b_pre also enters as (x - b_pre)
        loss_f, fvu_f, l0 = torch.stack([loss, fvu, n_active.float() / B]).tolist()
        return StepLosses(loss=loss_f, fvu=fvu_f, aux_fvu=0.0, l0=l0, n_dead=int(dead.sum()), fired=fired)
