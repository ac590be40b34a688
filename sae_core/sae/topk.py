"""The k-sparse (TopK) autoencoder of Gao et al. 2024, with a hand-written sparse backward pass.

    encode:  z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))
    decode:  x_hat = W_dec^T z + b_pre              (W_dec rows are unit-norm latent directions)
    loss:    FVU(x, x_hat) + aux_coef * min(n_dead / k_aux, 1) * FVU(e, e_hat)     [AuxK]
             where e = x - x_hat (detached) and e_hat decodes, without b_pre, the top k_aux
             pre-activations among dead latents. Multi-TopK adds FVU(x, x_hat_4k) / 8.

Why hand-written gradients: with TopK, the gradient of the pre-activations has only k non-zeros per
row, so the encoder and decoder gradients need only the k selected rows. Autograd would run a
dense [batch, n_latents] backward through the encoder matmul; we instead gather and index-add
k rows per token, and AuxK works on the dead columns only. The dense encoder matmul is then the
only dense work a step does. tests/test_sae.py checks these gradients against autograd.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SaescopeError
from .base import (
    ENCODE_BLOCK,
    GPU_BLOCK_ELEMENTS,
    DictionarySAE,
    GroupSum,
    StepFn,
    StepLosses,
    bf16_gemm,
    encode_block_rows,
    gemm_operand,
)
from .compiled import CompiledTopK
from .reductions import ordered_sum, weighted_row_sum
from .sparse import auxk_grads

# Sparse CSR is marked beta in PyTorch; the products we use are the stable core of it.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


@dataclass
class TopKConfig:
    """Architecture and loss settings of a TopK SAE."""

    d_in: int  # width of the activations (the model's d_model)
    n_latents: int = 16384  # dictionary size
    k: int = 32  # active latents per token
    k_aux: int | None = None  # AuxK: dead latents used to model the residual (default d_in // 2)
    aux_coef: float = 1 / 32  # AuxK loss weight
    multi_topk: bool = False  # add L(4k) / 8 so the code also works at larger k

    def __post_init__(self) -> None:
        if self.k_aux is None:
            self.k_aux = self.d_in // 2
        if not 0 < self.k < self.n_latents:
            raise SaescopeError(f"k must be between 1 and n_latents - 1 (got k={self.k}, n_latents={self.n_latents})")
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise SaescopeError(f"--multi-topk needs 4k <= n_latents (k={self.k}, n_latents={self.n_latents})")


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return ordered_sum((x - x_hat).pow(2)) / ordered_sum((x - x.mean(0)).pow(2)).clamp_min(1e-12)


__all__ = ["GroupSum", "TopKConfig", "TopKSAE", "fvu", "topk_backward", "variance_sum"]


def variance_sum(x: torch.Tensor, group_sum: GroupSum | None = None) -> torch.Tensor:
    """sum ||x - mean(x)||^2, FVU's denominator. With `group_sum` (the sum over data-parallel ranks) it is
    that of the whole group's batch, so each rank's loss is its share of the global batch's loss and the
    ranks' gradients add up to the global batch's gradient."""
    if group_sum is None:
        return ordered_sum((x - x.mean(0)).pow(2)).clamp_min(1e-12)  # reductions.py: the same at any thread count
    count = group_sum(torch.tensor([float(len(x))], dtype=x.dtype, device=x.device))
    mean = group_sum(x.sum(0)) / count
    return group_sum(ordered_sum((x - mean).pow(2))).clamp_min(1e-12)


def topk_backward(
    xc: torch.Tensor,
    g: torch.Tensor,
    z: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    held: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (W_enc, W_dec, b_enc) of one TopK reconstruction term, from its selected entries: the one
    backward of the single-process step (TopKSAE) and of each latent-parallel rank (LatentShardedTopKSAE).

    xc [B, d]: x - b_pre; g [B, d]: dLoss/dx_hat; z, vals [B, k]: the selected codes and pre-activations;
    idx [B, k]: their latents, as rows of W_dec [n, d]. `held` [B, k]: the entries this rank holds (latent
    parallel, idx local where held); None: all of them.

    Both directions are sparse products with the same [B, n] pattern of the selected entries: dL/dz is a
    sampled dense-dense product (only the selected <g, W_dec[i]>), and the weight gradients are
    (n x B) CSR @ (B x d) products.
    """
    B, k = idx.shape
    n = len(W_dec)
    if held is None:
        idx, perm = idx.sort(dim=1)  # CSR wants sorted column indices within a row
        cols = idx.reshape(-1)
        row_crow = torch.arange(0, B * k + 1, k, device=idx.device)
        z_e, vals_e = z.gather(1, perm).reshape(-1), vals.gather(1, perm).reshape(-1)
        token = torch.arange(B, device=idx.device).repeat_interleave(k)
    else:
        key = torch.where(held, idx, torch.full_like(idx, n))  # entries held elsewhere sort last in their row
        key, perm = key.sort(dim=1)
        held = key < n
        count = held.sum(1)
        if int(count.sum()) == 0:
            return torch.zeros_like(W_dec), torch.zeros_like(W_dec), W_dec.new_zeros(n)
        cols = key[held]
        z_e, vals_e = z.gather(1, perm)[held], vals.gather(1, perm)[held]
        row_crow = torch.zeros(B + 1, dtype=torch.long, device=g.device)
        row_crow[1:] = count.cumsum(0)
        token = torch.repeat_interleave(torch.arange(B, device=g.device), count)
    pattern = torch.sparse_csr_tensor(row_crow, cols, torch.zeros(len(cols), dtype=g.dtype, device=g.device), (B, n))
    gz = torch.sparse.sampled_addmm(pattern, g, W_dec.T, beta=0).values() * (vals_e > 0)
    order = cols.argsort(stable=True)
    lat_crow = torch.zeros(n + 1, dtype=torch.long, device=g.device)
    # per-latent counts by scatter_add: bincount would wait for the GPU (it sizes its output from the max)
    lat_crow[1:] = torch.zeros(n, dtype=torch.long, device=g.device).scatter_add_(0, cols, torch.ones_like(cols)).cumsum(0)
    by_latent = token[order]  # entry e holds a latent chosen by token[e]

    def per_latent(values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(lat_crow, by_latent, values[order], (n, B)) @ dense

    gW_dec = per_latent(z_e, g)  # dL/dW_dec[i] = sum over tokens choosing i of z * g
    gW_enc = per_latent(gz, xc)  # dL/dW_enc[i] = sum over tokens choosing i of dL/dpre * (x - b_pre)
    gb_enc = W_dec.new_zeros(n).index_add_(0, cols, gz)
    return gW_enc, gW_dec, gb_enc


class TopKSAE(DictionarySAE):
    architecture = "topk"
    saelens_architecture = "topk"
    imports_from = {"saelens": ("topk",), "sparsify": (None, "topk"), "openai": ("TopK",)}
    ENCODE_BLOCK = ENCODE_BLOCK
    GPU_BLOCK_ELEMENTS = GPU_BLOCK_ELEMENTS

    def fixed_code_width(self) -> int | None:
        return int(self.cfg.k)  # every position's code holds at most k latents by construction

    def compiled_step(self) -> StepFn | None:
        # a subclass (such as a variant with its own step) would not be what the compiled graph computes
        return CompiledTopK(self).loss_and_grads if type(self) is TopKSAE else None

    def saelens_cfg_fields(self) -> dict:
        return {"k": self.cfg.k}

    @classmethod
    def saelens_import_settings(cls, cfg: dict, w: dict[str, torch.Tensor], where: str | Path) -> dict:
        require_unit_decoder(cfg, w, where)
        return {}

    # ------------------------------------------------------------------ inference (autograd-friendly)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_pre) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense latent activations [..., n_latents]; `k` overrides the trained k (Multi-TopK codes)."""
        vals, idx = self.pre_activations(x).topk(k or self.cfg.k, dim=-1)
        return torch.zeros(*x.shape[:-1], self.cfg.n_latents, dtype=vals.dtype, device=x.device).scatter_(-1, idx, vals.relu())

    def encode_sparse(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [..., k] after ReLU, latent indices [..., k]) in descending order."""
        vals, idx = self.pre_activations(x).topk(k or self.cfg.k, dim=-1)
        return vals.relu(), idx

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_pre

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat = nn.functional.embedding_bag(
            idx.reshape(-1, idx.shape[-1]), self.W_dec, mode="sum", per_sample_weights=vals.reshape(-1, idx.shape[-1]).to(self.W_dec.dtype)
        )
        return flat.reshape(*idx.shape[:-1], -1) + self.b_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x."""
        return self.decode_sparse(*self.encode_sparse(x))

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """Compute the loss of batch x, set every parameter's .grad, and report statistics (base.StepLosses).

        `dead` is a bool mask [n_latents] of latents that have not fired for the dead threshold. On a GPU
        the step waits for the device twice: for the number of dead latents (it sets AuxK's shapes) and for
        the statistics at the end. `group_sum`: data parallel, x is this rank's part of the batch (see
        `variance_sum`); loss, fvu and aux_fvu are this rank's share.
        """
        cfg = self.cfg
        B = x.shape[0]
        for p in self.parameters():  # free last step's gradients first: their memory is reused for this step's
            p.grad = None
        xc = x - self.b_pre
        k_main = 4 * cfg.k if cfg.multi_topk else cfg.k
        dead_idx = dead.nonzero().squeeze(1) if cfg.aux_coef else dead.new_zeros(0, dtype=torch.long)
        n_dead = len(dead_idx)
        # Encode in row blocks: each [rows, n] block of pre-activations is selected from while it is
        # still in cache, and the whole [B, n] matrix is never materialised. AuxK keeps only the dead columns.
        # bf16: operands rounded to bf16, products accumulated in fp32, the result rounded to bf16 (base.bf16_gemm);
        # with a real bf16 GEMM the block stays bf16 and TopK selects from it directly.
        operand = bf16_gemm(autocast_bf16, x.device.type)
        W_T, bias, xg = gemm_operand(self.W_enc, operand).T, gemm_operand(self.b_enc, operand), gemm_operand(xc, operand)
        pre_dead = torch.empty(B, n_dead, dtype=W_T.dtype, device=x.device) if n_dead else x.new_empty(0, 0)
        vals_parts: list[torch.Tensor] = []
        idx_parts: list[torch.Tensor] = []
        block_rows = encode_block_rows(x.device.type, cfg.n_latents)
        for s in range(0, B, block_rows):
            rows = xg[s : s + block_rows]
            block = torch.addmm(bias, rows, W_T)
            if operand == "rounded":
                block.copy_(block.bfloat16())
            v, i = block.topk(k_main, dim=1, sorted=cfg.multi_topk)  # Multi-TopK takes the first k of its 4k
            vals_parts.append(v.float())
            idx_parts.append(i)
            if n_dead:
                torch.index_select(block, 1, dead_idx, out=pre_dead[s : s + len(rows)])
        vals_all, idx_all = (torch.cat(vals_parts), torch.cat(idx_parts)) if len(vals_parts) > 1 else (vals_parts[0], idx_parts[0])
        denom = variance_sum(x, group_sum)

        grads: tuple[torch.Tensor, ...] | None = None  # (W_enc, W_dec, b_enc, b_pre): the first term's products, to which later terms add
        terms = [(cfg.k, 1.0)] + ([(4 * cfg.k, 1 / 8)] if cfg.multi_topk else [])
        loss = aux_fvu = x.new_zeros(())  # device scalars, read back once at the end
        residual = x
        for k, weight in terms:
            vals, idx = vals_all[:, :k], idx_all[:, :k]
            z = vals.relu()
            x_hat = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=z, mode="sum") + self.b_pre
            err = x - x_hat
            term = ordered_sum(err.pow(2)) / denom
            loss = loss + weight * term
            if k == cfg.k:
                residual = err.clone()  # e = x - x_hat, the AuxK target (no gradient flows into it)
                fvu_k, l0 = term, (z > 0).sum() / B
                fired = (
                    torch.zeros(cfg.n_latents, dtype=z.dtype, device=x.device).scatter_reduce_(0, idx.flatten(), z.flatten(), "amax") > 0
                )
            g = err.mul_(-2.0 * weight / denom)  # dLoss/dx_hat, [B, d]
            term_grads = (*topk_backward(xc, g, z, vals, idx, self.W_dec), g.sum(0))
            grads = term_grads if grads is None else tuple(a.add_(b) for a, b in zip(grads, term_grads))
        assert grads is not None
        gW_enc, gW_dec, gb_enc, gb_pre = grads

        if n_dead:
            # AuxK's four products run over the dead columns only, in the encoder GEMM's dtype (as autocast would)
            e_var = variance_sum(residual, group_sum)
            weighted_aux, aux_fvu = auxk_grads(self, pre_dead, dead_idx, residual, xg, (gW_enc, gW_dec, gb_enc), operand, e_var)
            del pre_dead
            loss = loss + weighted_aux
        del residual

        # b_pre enters the encoder as (x - b_pre): its gradient there is -(dL/db_enc) @ W_enc.
        gb_pre -= weighted_row_sum(gb_enc, self.W_enc)
        self.W_enc.grad, self.W_dec.grad, self.b_enc.grad, self.b_pre.grad = gW_enc, gW_dec, gb_enc, gb_pre
        loss, fvu_k, l0, aux_fvu = torch.stack([loss, fvu_k, l0.float(), aux_fvu]).tolist()
        return StepLosses(loss=loss, fvu=fvu_k, aux_fvu=aux_fvu, l0=l0, n_dead=n_dead, fired=fired)


def require_unit_decoder(cfg: dict, w: dict[str, torch.Tensor], where: str | Path) -> None:
    """A SAELens training folder of a TopK-style SAE that rescales its codes by the decoder's norms loads
    only when those norms are 1 (our decoders are unit-norm)."""
    W_dec = w["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm") and not torch.allclose(W_dec.float().norm(dim=1), torch.ones(len(W_dec)), atol=1e-4):
        raise SaescopeError(
            f"{where}: a {cfg.get('architecture')} training folder with rescale_acts_by_decoder_norm and a decoder of other than "
            f"unit norms; save it with SAELens' save_inference_model (a jumprelu SAE) and import that"
        )
