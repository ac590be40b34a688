"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2025): BatchTopK whose dictionary is scored as a
sequence of nested prefixes.

    z:       BatchTopK's codes (batchtopk.py), over the whole dictionary
    loss:    sum over prefix sizes m_1 < m_2 < ... < n_latents of FVU(x, W_dec[:m]^T z[:m] + b_pre)
             + AuxK over dead latents

Each prefix must reconstruct the input by itself, so the first latents learn general features and later
ones refine them instead of absorbing them (a "starts with S" latent keeps firing on "snake"). The
gradient of one code entry sums the errors of every prefix that holds it, which BatchTopKSAE computes in
one sampled product (see its loss_and_grads); a step costs about what a BatchTopK step does.
Saved like BatchTopK: SAELens' "jumprelu" with one threshold for every latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SaescopeError
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """BatchTopK's settings and the nested prefix sizes (the whole dictionary is always the last)."""

    # nested sizes, ascending (SAELens' matryoshka_widths), as a list or "1024,4096"; default n/16, n/4, n
    prefix_sizes: list[int] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        given = self.prefix_sizes
        try:
            sizes = [int(s) for s in given.split(",")] if isinstance(given, str) else [int(s) for s in given or []]
        except ValueError as exc:
            raise SaescopeError(f"prefix sizes are whole numbers separated by commas (got {given!r})") from exc
        sizes = sizes or [self.n_latents // 16, self.n_latents // 4]
        if sizes[-1] != self.n_latents:
            sizes.append(self.n_latents)
        if sizes[0] <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] != self.n_latents:
            raise SaescopeError(
                f"prefix sizes must increase strictly from above 0 up to n_latents={self.n_latents} (got {self.prefix_sizes})"
            )
        self.prefix_sizes = sizes


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    imports_from = {"saelens": ("matryoshka_batchtopk",)}  # SAELens' training folders
    cfg: MatryoshkaConfig

    @classmethod
    def saelens_import_settings(cls, cfg: dict, w: dict[str, torch.Tensor], where: str | Path) -> dict:
        return {**super().saelens_import_settings(cfg, w, where), "prefix_sizes": cfg.get("matryoshka_widths")}

    def prefix_sizes(self) -> list[int]:
        assert isinstance(self.cfg.prefix_sizes, list)  # normalised by MatryoshkaConfig
        return list(self.cfg.prefix_sizes)
