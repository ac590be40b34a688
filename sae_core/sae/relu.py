"""The ReLU + L1 sparse autoencoder: the baseline of Gao et al. 2024, Fig. 2a.

    encode:  z = ReLU(W_enc (x - b_pre) + b_enc)
    decode:  x_hat = W_dec^T z + b_pre          (unit-norm decoder rows, as for TopK)
    loss:    FVU(x, x_hat) + l1_coef * mean over tokens of sum_i z_i

Its gradients are dense anyway, so it uses autograd; the trainer drives it through the same
`loss_and_grads` interface as TopKSAE, and the bf16 option runs its encoder GEMM the way TopK's does
(base.bf16_gemm: a real bf16 GEMM on bf16 hardware, CUDA included; elsewhere the same numbers at fp32 speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DictionarySAE, GroupSum, StepLosses, bf16_gemm, gemm_operand
from .topk import fvu, variance_sum


@dataclass
class ReluConfig:
    d_in: int
    n_latents: int = 16384
    l1_coef: float = 1e-2  # sparsity penalty: larger gives lower L0 and higher FVU


class ReluSAE(DictionarySAE):
    architecture = "relu"
    saelens_architecture = "standard"
    imports_from = {"saelens": ("standard",), "openai": (None, "ReLU")}

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return ((x - self.b_pre) @ self.W_enc.T + self.b_enc).relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x) @ self.W_dec + self.b_pre

    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        for p in self.parameters():
            p.grad = None
        kind = bf16_gemm(autocast_bf16, x.device.type)
        with torch.enable_grad():
            pre = torch.addmm(gemm_operand(self.b_enc, kind), gemm_operand(x - self.b_pre, kind), gemm_operand(self.W_enc, kind).T)
            z = (pre if kind is None else pre.bfloat16().float()).relu()
            x_hat = z @ self.W_dec + self.b_pre
            if group_sum is None:
                recon = fvu(x, x_hat)
                loss = recon + self.cfg.l1_coef * z.sum(1).mean()
            else:  # data parallel: this rank's share of the global batch's loss (topk.variance_sum)
                recon = (x - x_hat).pow(2).sum() / variance_sum(x, group_sum)
                n_global = group_sum(torch.tensor([float(len(x))], device=x.device))
                loss = recon + self.cfg.l1_coef * z.sum() / n_global
            loss.backward()
        active = z.detach() > 0
        loss, recon, l0, n_dead = torch.stack(
            [loss.detach(), recon.detach(), active.sum() / len(x), dead.sum()]
        ).tolist()  # one wait for the device
        return StepLosses(loss=loss, fvu=recon, aux_fvu=0.0, l0=l0, fired=active.any(0), n_dead=int(n_dead))
