"""The ReLU + L1 sparse autoencoder: the baseline of Gao et al. 2024, Fig. 2a.

    encode:  z = ReLU(W_enc (x - b_pre) + b_enc)
    decode:  x_hat = W_dec^T z + b_pre          (unit-norm decoder rows, as for TopK)
    loss:    FVU(x, x_hat) + l1_coef * mean over tokens of sum_i z_i

Its gradients are dense anyway, so it uses autograd; the trainer drives it through the same
`loss_and_grads` interface as TopKSAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DictionarySAE
from .topk import fvu


@dataclass
class ReluConfig:
    d_in: int
    n_latents: int = 16384
    l1_coef: float = 1e-2          # sparsity penalty: larger gives lower L0 and higher FVU


class ReluSAE(DictionarySAE):
    architecture = "relu"

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return ((x - self.b_pre) @ self.W_enc.T + self.b_enc).relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x) @ self.W_dec + self.b_pre

    def loss_and_grads(self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False) -> dict:
        for p in self.parameters():
            p.grad = None
        with torch.enable_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast_bf16):
            z = self.encode(x)
            x_hat = z.float() @ self.W_dec + self.b_pre
            recon = fvu(x, x_hat)
            loss = recon + self.cfg.l1_coef * z.float().sum(1).mean()
            loss.backward()
        active = z.detach() > 0
        return {"loss": loss.item(), "fvu": recon.item(), "aux_fvu": 0.0, "l0": active.sum().item() / len(x),
                "fired": active.any(0).nonzero().squeeze(1), "n_dead": int(dead.sum())}
