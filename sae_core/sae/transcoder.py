"""Transcoders: a sparse code read from layer L's MLP input that predicts that MLP's output (Dunefsky et al.
2024), with an optional linear skip term (Paulo et al. 2025, "Transcoders beat sparse autoencoders").

    encode:  z = ReLU(TopK_k(W_enc x + b_enc))                    x: the MLP's (normalised) input, blocks.L.hook_mlp_in
    decode:  y_hat = W_dec^T z + b_pre  [+ W_skip x]              y: the MLP's output, blocks.L.hook_mlp_out
    loss:    FVU(y, y_hat) + AuxK over the dead latents, modelling y - y_hat (as topk.py)

The input is not centred (SAELens' transcoders apply no b_dec to their input: its b_dec, our b_pre, is the
output's bias). A training batch holds each position's input and target side by side, [B, 2 * d_in]
(`pair`), so the trainer's step (and its checkpointing) treats a transcoder like any other SAE.

Saved as SAELens 6 saves its transcoders: architecture "transcoder" or "skip_transcoder", cfg fields d_out,
hook_name_out, hook_layer_out, the tensors W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec [d_out]
and W_skip [d_out, d_in]. SAELens' transcoder classes apply a ReLU; ours keeps the k it was trained with
(cfg.json's k, as our TopK SAEs save it): a reader that ignores k gets more active latents than trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import SaescopeError
from .base import DictionarySAE, GroupSum, StepLosses, bf16_gemm, encode_block_rows, gemm_operand
from .reductions import ordered_sum
from .sparse import auxk_grads
from .topk import topk_backward, variance_sum


@dataclass
class TranscoderConfig:
    """Architecture and loss settings of a TopK transcoder of one layer's MLP (input and output both d_in wide)."""

    d_in: int  # the model's d_model: the MLP's input and output width
    n_latents: int = 4096  # dictionary size
    k: int = 32  # active latents per token
    k_aux: int | None = None  # AuxK: dead latents used to model the residual (default d_in // 2)
    aux_coef: float = 1 / 32  # AuxK loss weight
    layer: int | None = None  # the decoder layer whose MLP it stands in for (names its hooks)

    def __post_init__(self) -> None:
        if self.k_aux is None:
            self.k_aux = self.d_in // 2
        if not 0 < self.k < self.n_latents:
            raise SaescopeError(f"k must be between 1 and n_latents - 1 (got k={self.k}, n_latents={self.n_latents})")


def mlp_in_hook(layer: int) -> str:
    """The hook a transcoder of layer `layer` reads: the MLP's input (after the layer's pre-MLP norm)."""
    return f"blocks.{layer}.hook_mlp_in"


def mlp_out_hook(layer: int) -> str:
    """The hook a transcoder of layer `layer` predicts: the MLP's output (before it joins the residual stream)."""
    return f"blocks.{layer}.hook_mlp_out"


def pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A transcoder's training batch: MLP inputs x and outputs y [B, d], side by side [B, 2d]."""
    return torch.cat([x, y], dim=-1)


class TranscoderSAE(DictionarySAE):
    """A TopK transcoder without a skip term; W_enc, b_enc, W_dec (unit-norm rows), b_pre (the output bias)."""

    architecture = "transcoder"
    saelens_architecture = "transcoder"
    imports_from: ClassVar[dict[str, tuple[str | None, ...]]] = {}  # SAELens' own transcoders are ReLU ones: not ours to read as TopK

    def fixed_code_width(self) -> int | None:
        return int(self.cfg.k)

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W_enc, self.b_enc  # no input centring

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """The linear skip term's contribution for inputs x, or None without one."""
        return None

    def bias_init_rows(self, sample: torch.Tensor) -> torch.Tensor:
        return sample[:, self.cfg.d_in :]  # b_pre is the output's bias: it starts at the targets' geometric median

    def saelens_cfg_fields(self) -> dict:
        fields: dict = {"k": self.cfg.k, "d_out": self.cfg.d_in, "apply_b_dec_to_input": False}
        if self.cfg.layer is not None:
            fields.update(hook_name_out=mlp_out_hook(self.cfg.layer), hook_layer_out=self.cfg.layer, hook_head_index_out=None)
        return fields

    # ------------------------------------------------------------------ inference

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        vals, idx = self.pre_activations(x).topk(k or self.cfg.k, dim=-1)
        return torch.zeros(*x.shape[:-1], self.cfg.n_latents, dtype=vals.dtype, device=x.device).scatter_(-1, idx, vals.relu())

    def encode_sparse(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [..., k] after ReLU, latent indices [..., k]) in descending order."""
        vals, idx = self.pre_activations(x).topk(k or self.cfg.k, dim=-1)
        return vals.relu(), idx

    def transcode(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted MLP output for MLP inputs x [..., d]: the sparse code's decoding plus the skip term."""
        vals, idx = self.encode_sparse(x)
        flat = nn.functional.embedding_bag(
            idx.reshape(-1, idx.shape[-1]), self.W_dec, mode="sum", per_sample_weights=vals.reshape(-1, idx.shape[-1]).to(self.W_dec.dtype)
        )
        out = flat.reshape(*idx.shape[:-1], -1) + self.b_pre
        skip = self.skip(x)
        return out if skip is None else out + skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted MLP output (a transcoder does not reconstruct its input)."""
        return self.transcode(x)

    # ------------------------------------------------------------------ training

    def _skip_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Set the skip term's gradient from dLoss/dy_hat `g` (architectures with one override this)."""

    @torch.no_grad()
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """One step on `pair(inputs, targets)` [B, 2d]: set every parameter's .grad, report the statistics."""
        cfg = self.cfg
        d = cfg.d_in
        if x.shape[-1] != 2 * d:
            raise SaescopeError(
                f"a transcoder trains on (MLP input, MLP output) pairs of width {2 * d}, got width {x.shape[-1]}: "
                f"train it with `saescope train --transcoders`"
            )
        for p in self.parameters():
            p.grad = None
        xin, y = x[:, :d], x[:, d:]
        B = len(x)
        dead_idx = dead.nonzero().squeeze(1) if cfg.aux_coef else dead.new_zeros(0, dtype=torch.long)
        n_dead = len(dead_idx)
        operand = bf16_gemm(autocast_bf16, x.device.type)
        W_T, bias, xg = gemm_operand(self.W_enc, operand).T, gemm_operand(self.b_enc, operand), gemm_operand(xin, operand)
        pre_dead = torch.empty(B, n_dead, dtype=W_T.dtype, device=x.device) if n_dead else x.new_empty(0, 0)
        vals_parts, idx_parts = [], []
        block_rows = encode_block_rows(x.device.type, cfg.n_latents)
        for s in range(0, B, block_rows):
            block = torch.addmm(bias, xg[s : s + block_rows], W_T)
            if operand == "rounded":
                block.copy_(block.bfloat16())
            v, i = block.topk(cfg.k, dim=1, sorted=False)
            vals_parts.append(v.float())
            idx_parts.append(i)
            if n_dead:
                torch.index_select(block, 1, dead_idx, out=pre_dead[s : s + len(block)])
        vals, idx = torch.cat(vals_parts), torch.cat(idx_parts)
        denom = variance_sum(y, group_sum)
        z = vals.relu()
        y_hat = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=z, mode="sum") + self.b_pre
        skip = self.skip(xin)
        if skip is not None:
            y_hat += skip
        err = y - y_hat
        fvu_k = ordered_sum(err.pow(2)) / denom
        l0 = (z > 0).sum() / B
        fired = torch.zeros(cfg.n_latents, dtype=z.dtype, device=x.device).scatter_reduce_(0, idx.flatten(), z.flatten(), "amax") > 0
        residual = err.clone()
        g = err.mul_(-2.0 / denom)  # dLoss/dy_hat
        gW_enc, gW_dec, gb_enc = topk_backward(xin, g, z, vals, idx, self.W_dec)
        loss = fvu_k
        aux_fvu = x.new_zeros(())
        if n_dead:
            weighted_aux, aux_fvu = auxk_grads(
                self, pre_dead, dead_idx, residual, xg, (gW_enc, gW_dec, gb_enc), operand, variance_sum(residual, group_sum)
            )
            loss = loss + weighted_aux
        self.W_enc.grad, self.W_dec.grad, self.b_enc.grad, self.b_pre.grad = gW_enc, gW_dec, gb_enc, g.sum(0)
        self._skip_grad(xin, g)
        loss_f, fvu_f, l0_f, aux_f = torch.stack([loss, fvu_k, l0.float(), aux_fvu]).tolist()
        return StepLosses(loss=loss_f, fvu=fvu_f, aux_fvu=aux_f, l0=l0_f, n_dead=n_dead, fired=fired)

    @torch.no_grad()
    def fold_input_scale(self, factor: float) -> None:
        """Make the transcoder take inputs `factor` times smaller: W_enc (and W_skip) times `factor`. A
        transcoder trained on inputs and targets scaled apart (x * s_in, y * s_out) is folded with
        s_in / s_out and then saved with scale s_out: it then takes and gives raw activations."""
        self.W_enc.mul_(factor)


class SkipTranscoderSAE(TranscoderSAE):
    """A TopK transcoder with a linear skip term y_hat += W_skip x (W_skip [d, d], starting at zero)."""

    architecture = "skip_transcoder"
    saelens_architecture = "skip_transcoder"

    def __init__(self, cfg: TranscoderConfig):
        super().__init__(cfg)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in))  # [d_out, d_in], as SAELens holds it

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        return x @ self.W_skip.T

    def _skip_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        self.W_skip.grad = g.T @ x

    @torch.no_grad()
    def fold_input_scale(self, factor: float) -> None:
        super().fold_input_scale(factor)
        self.W_skip.mul_(factor)

    def saelens_tensors(self, scale: float) -> dict[str, torch.Tensor]:
        # the skip term is linear in x: taking inputs and giving outputs both divided by `scale` leaves it as it is
        return {**super().saelens_tensors(scale), "W_skip": self.W_skip.detach().float().cpu().contiguous()}

    @torch.no_grad()
    def load_saelens_tensors(self, w: dict[str, torch.Tensor], W_enc_nd: torch.Tensor, where: str | Path) -> None:
        super().load_saelens_tensors(w, W_enc_nd, where)
        W_skip = w.get("W_skip")
        if W_skip is None or tuple(W_skip.shape) != tuple(self.W_skip.shape):
            raise SaescopeError(f"{where}: a skip transcoder's weights must hold W_skip of shape {tuple(self.W_skip.shape)}")
        self.W_skip.copy_(W_skip.float())
