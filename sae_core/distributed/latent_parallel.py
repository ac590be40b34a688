"""Latent-parallel TopK: a dictionary too wide for one device, its latents split across the ranks of a
latent-parallel group (the paper's scheme for its 16M-latent autoencoder).

Rank j of N holds latents [j n/N, (j+1) n/N) of W_enc, b_enc and W_dec, and a copy of b_pre; every rank
of the group sees the same batch. One step:

  1. local pre-activations [B, n/N] and their local top-k (values, indices): the global top-k of a row
     is the top-k of the N local top-k candidates, so only [B, k] values and indices per rank are
     exchanged (all-gather), never the [B, n] pre-activations;
  2. each rank decodes its own selected latents; the partial reconstructions are summed (all-reduce);
  3. the error is then the same on every rank, and each computes the sparse gradients of its own
     latents (topk.topk_backward, the single-process step's backward, over the entries it holds);
  4. AuxK likewise: local top-k_aux candidates over the local dead latents, exchanged, the global
     top-k_aux selected, partial residual reconstructions summed;
  5. b_pre's gradient needs sum_i dL/db_enc[i] W_enc[i] over all latents: summed (all-reduce of [d]).

Adam, the parallel-gradient removal and the decoder renormalisation are per latent or per element, so
they run on each rank's slice unchanged. Combined with data parallelism the denominators and the
gradients are summed over the data-parallel group as for the unsharded SAE (`group_sum`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import SaescopeError
from ..sae.base import DictionaryParameters, DictionarySAE, GroupSum, StepLosses, bf16_gemm, encode_block_rows, gemm, gemm_operand
from ..sae.topk import TopKConfig, TopKSAE, topk_backward, variance_sum
from .comms import Comms


class LatentShardedTopKSAE(DictionaryParameters):
    """This rank's slice of a TopK SAE: parameters W_enc, b_enc, W_dec [n/N, ...] and b_pre [d]; `cfg` is
    the whole SAE's (n_latents is the global width, as the learning rate and AuxK need). It trains (the
    trainer's part of the interface); `gather` gives the whole SAE for everything else."""

    def __init__(self, cfg: TopKConfig, comms: Comms):
        if cfg.n_latents % comms.size:
            raise SaescopeError(f"--n-latents {cfg.n_latents} must be a multiple of --latent-parallel {comms.size}")
        self.n_local = cfg.n_latents // comms.size
        super().__init__(SimpleNamespace(n_latents=self.n_local, d_in=cfg.d_in))
        self.cfg, self.comms = cfg, comms
        self.offset = comms.rank * self.n_local

    # ------------------------------------------------------------------ the whole SAE from its slices

    def slice_of(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of an unsharded state dict (W_enc, b_enc, W_dec, b_pre)."""
        lo, hi = self.offset, self.offset + self.n_local
        return {name: (t if name == "b_pre" else t[lo:hi]) for name, t in full.items()}

    @torch.no_grad()
    def gather(self) -> TopKSAE:
        """The unsharded SAE (on every rank of the group): for saving the trained weights."""
        full = TopKSAE(self.cfg).to(self.W_enc.device)
        for name in ("W_enc", "b_enc", "W_dec"):
            part = getattr(self, name)
            getattr(full, name).copy_(self.comms.all_gather(part.detach()).reshape(-1, *part.shape[1:]))
        full.b_pre.copy_(self.b_pre)
        return full

    # ------------------------------------------------------------------ training

    def _global_topk(self, vals: torch.Tensor, idx: torch.Tensor, k: int, sorted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of local candidates (values [B, c], global latent indices [B, c], padded with -inf) -> the
        group's top-k of each row."""
        B = len(vals)
        cand_v = self.comms.all_gather(vals).permute(1, 0, 2).reshape(B, -1)
        cand_i = self.comms.all_gather(idx.int()).permute(1, 0, 2).reshape(B, -1)
        v, where = cand_v.topk(k, dim=1, sorted=sorted)
        return v, cand_i.gather(1, where).long()

    def _owned(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of the global indices this rank holds, their local indices; 0 where not held)."""
        local = idx - self.offset
        mine = (local >= 0) & (local < self.n_local)
        return mine, torch.where(mine, local, torch.zeros_like(local))

    @torch.no_grad()
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """TopKSAE.loss_and_grads for this slice: `dead` is the mask of this rank's latents; every rank of
        the group gets the same loss and statistics, `fired` covers its own latents, n_dead all of them."""
        cfg, comms = self.cfg, self.comms
        B, n_loc = x.shape[0], self.n_local
        for p in self.parameters():
            p.grad = None
        xc = x - self.b_pre
        k_main = 4 * cfg.k if cfg.multi_topk else cfg.k
        dead_idx = dead.nonzero().squeeze(1) if cfg.aux_coef else dead.new_zeros(0, dtype=torch.long)
        n_dead_local = len(dead_idx)
        n_dead = int(comms.sum(torch.tensor([n_dead_local], device=x.device)).item())
        operand = bf16_gemm(autocast_bf16, x.device.type)
        W_T, bias, xg = gemm_operand(self.W_enc, operand).T, gemm_operand(self.b_enc, operand), gemm_operand(xc, operand)
        pre_dead = torch.empty(B, n_dead_local, dtype=W_T.dtype, device=x.device) if n_dead_local else x.new_empty(B, 0)
        k_cand = min(k_main, n_loc)
        vals_parts, idx_parts = [], []
        block_rows = encode_block_rows(x.device.type, n_loc)
        for s in range(0, B, block_rows):
            block = torch.addmm(bias, xg[s : s + block_rows], W_T)
            if operand == "rounded":
                block.copy_(block.bfloat16())
            v, i = block.topk(k_cand, dim=1, sorted=False)
            vals_parts.append(v.float())
            idx_parts.append(i + self.offset)
            if n_dead_local:
                torch.index_select(block, 1, dead_idx, out=pre_dead[s : s + len(block)])
        vals_all, idx_all = self._global_topk(torch.cat(vals_parts), torch.cat(idx_parts), k_main, sorted=cfg.multi_topk)
        denom = variance_sum(x, group_sum)

        gW_enc, gW_dec = torch.zeros_like(self.W_enc), torch.zeros_like(self.W_dec)
        gb_enc, gb_pre = torch.zeros_like(self.b_enc), torch.zeros_like(self.b_pre)
        terms = [(cfg.k, 1.0)] + ([(4 * cfg.k, 1 / 8)] if cfg.multi_topk else [])
        loss = aux_fvu = x.new_zeros(())
        residual = x
        for k, weight in terms:
            vals, idx = vals_all[:, :k], idx_all[:, :k]
            z = vals.relu()
            mine, local = self._owned(idx)
            z_mine = torch.where(mine, z, torch.zeros_like(z))
            partial = nn.functional.embedding_bag(local, self.W_dec, per_sample_weights=z_mine, mode="sum")
            x_hat = comms.sum(partial) + self.b_pre
            err = x - x_hat
            term = err.pow(2).sum() / denom
            loss = loss + weight * term
            if k == cfg.k:
                residual = err.clone()
                fvu_k, l0 = term, (z > 0).sum() / B
                fired = torch.zeros(n_loc, dtype=z.dtype, device=x.device).scatter_reduce_(0, local[mine], z[mine], "amax") > 0
            g = err.mul_(-2.0 * weight / denom)
            a, b, c = topk_backward(xc, g, z, vals, local, self.W_dec, held=mine)
            gW_enc.add_(a)
            gW_dec.add_(b)
            gb_enc.add_(c)
            gb_pre.add_(g.sum(0))

        if n_dead:  # every rank enters: the exchanges below are collective, whether or not it holds dead latents
            k_aux = min(cfg.k_aux, n_dead)
            cand_v = torch.full((B, k_aux), float("-inf"), device=x.device)
            cand_i = torch.full((B, k_aux), -1, dtype=torch.long, device=x.device)
            if n_dead_local:
                v, i = pre_dead.topk(min(k_aux, n_dead_local), dim=1, sorted=False)
                cand_v[:, : v.shape[1]] = v.float()
                cand_i[:, : v.shape[1]] = dead_idx[i] + self.offset
            del pre_dead
            aux_vals, aux_idx = self._global_topk(cand_v, cand_i, k_aux, sorted=False)
            aux_vals = aux_vals.to(W_T.dtype)
            mine, local = self._owned(aux_idx)
            position = torch.full((n_loc,), 0, dtype=torch.long, device=x.device)  # latent -> its column among the dead
            position[dead_idx] = torch.arange(n_dead_local, device=x.device)
            col = position[local]
            e_var = variance_sum(residual, group_sum)
            active = torch.where(mine, aux_vals.relu(), torch.zeros_like(aux_vals))
            Z = torch.zeros(B, n_dead_local, dtype=aux_vals.dtype, device=x.device)
            if n_dead_local:
                Z.scatter_add_(1, col, active)
            W_dead = gemm_operand(self.W_dec[dead_idx], operand)
            partial = (gemm_operand(Z, operand) @ W_dead).float()  # rounded once, after the sum (as the unsharded GEMM's result)
            e_hat = comms.sum(partial)
            if operand is not None:
                e_hat = e_hat.bfloat16().float()
            aux_err = residual - e_hat
            aux_fvu = aux_err.pow(2).sum() / e_var
            scale = cfg.aux_coef * min(n_dead / cfg.k_aux, 1.0)
            loss = loss + scale * aux_fvu
            if n_dead_local:
                g_aux = gemm_operand(aux_err.mul_(-2.0 * scale / e_var), operand)
                gW_dec.index_add_(0, dead_idx, gemm(Z.T, g_aux, operand).float())
                gz = torch.gather(gemm(g_aux, W_dead.T, operand), 1, col) * ((aux_vals > 0) & mine)
                G = Z.zero_().scatter_add_(1, col, gz.to(Z.dtype))
                gW_enc.index_add_(0, dead_idx, gemm(G.T, xg, operand).float())
                gb_enc.index_add_(0, dead_idx, G.sum(0, dtype=torch.float32))
        del residual

        gb_pre -= comms.sum(gb_enc @ self.W_enc)
        self.W_enc.grad, self.W_dec.grad, self.b_enc.grad, self.b_pre.grad = gW_enc, gW_dec, gb_enc, gb_pre
        loss, fvu_k, l0, aux_fvu = torch.stack([loss, fvu_k, l0.float(), aux_fvu]).tolist()
        return StepLosses(loss=loss, fvu=fvu_k, aux_fvu=aux_fvu, l0=l0, n_dead=n_dead, fired=fired)


# the architectures whose SAEs can be split across a latent-parallel group: SAE class -> its slice's class
SHARDED: dict[type[DictionarySAE], type[LatentShardedTopKSAE]] = {TopKSAE: LatentShardedTopKSAE}


def sharded(sae_cls: type[DictionarySAE], cfg: Any, comms: Comms) -> LatentShardedTopKSAE:
    """This rank's slice of an SAE of class `sae_cls` with config `cfg`, or an error for architectures that do not split."""
    if (slice_cls := SHARDED.get(sae_cls)) is None:
        splits = ", ".join(cls.architecture for cls in SHARDED)
        raise SaescopeError(f"--latent-parallel splits {splits} SAEs only; train {sae_cls.architecture} data-parallel")
    return slice_cls(cfg, comms)
