"""TopKSAE.loss_and_grads as one fixed-shape graph for torch.compile: `--compile` (issue 26).

On a GPU the eager step launches about 110 small kernels, and the host takes as long to issue them as
the GPU to run them (bench/RESULTS.md, "TopK training on a GPU"). Here the same loss and gradients are
written without sparse tensors or data-dependent shapes, so torch.compile captures the whole of it in
one graph: inductor fuses the gathers and scatter-adds of the sparse backward into a few kernels
(Triton on a GPU, C++ on the CPU), and on CUDA `mode="reduce-overhead"` replays that graph as a CUDA
graph, one launch per step. The results are those of the eager step up to the order of floating-point
sums (tests/test_compiled_step.py); the scatter-adds use atomics, so on the CPU too a run is no longer
bitwise reproducible, which is why the CPU keeps the eager step unless asked.

Fixed shapes: AuxK's work is over the dead latents, whose number changes from step to step. Their
indices are padded to a power of two (at least 256, at most n_latents); the padding columns are masked
to -inf before AuxK's top-k, so they are never chosen and add exact zeros. A run then compiles at most
once more when the count first changes bucket (torch.compile turns that size dynamic) and, on CUDA,
records one CUDA graph per bucket. Adam and the decoder renormalisation stay eager: fused Adam is one
launch for all four parameters, and the optimiser and its checkpoints are exactly those of the eager step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import SaescopeError
from .base import ENCODE_BLOCK, DictionarySAE, GroupSum, StepLosses, bf16_gemm, gemm, gemm_operand

MIN_DEAD_BUCKET = 256  # the smallest padded dead count: fewer buckets (graphs) at the cost of a little padding


def dead_bucket(n_dead: int, n_latents: int) -> int:
    """The padded size of AuxK's dead-latent columns: 0 without dead latents, else the next power of two
    from MIN_DEAD_BUCKET up, at most n_latents."""
    if n_dead == 0:
        return 0
    return min(n_latents, max(MIN_DEAD_BUCKET, 1 << (n_dead - 1).bit_length()))


def _per_latent_sum(flat_idx: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """[n, d]: for each latent, the sum over the tokens choosing it of weight * that token's row.
    flat_idx, weights: [B, k]; rows: [B, d]. Written as a scatter-add of a product that inductor fuses
    into one kernel (eager PyTorch would materialise the [B, k, d] product)."""
    d = rows.shape[1]
    contrib = (weights.unsqueeze(2) * rows.unsqueeze(1)).reshape(-1, d)
    return torch.zeros(n, d, dtype=rows.dtype, device=rows.device).index_add_(0, flat_idx.reshape(-1), contrib)


def chunked_topk(block: torch.Tensor, k: int, sorted: bool, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """block.topk(k, dim=1) in two stages: the top k of each of `chunks` equal column chunks, then the top k
    of those chunks * k candidates. The same selection (every row's top k lies in its chunks' top k; equal
    values may be taken in another order), in several short selections instead of one over n columns,
    which may be faster on a GPU (bench/gpu_check.sh times it). chunks <= 1: torch.topk as it is."""
    if chunks <= 1:
        return block.topk(k, dim=1, sorted=sorted)
    rows, width = block.shape[0], block.shape[1] // chunks
    vals, idx = block.view(rows, chunks, width).topk(k, dim=2, sorted=False)
    idx = idx + torch.arange(0, chunks * width, width, device=block.device).unsqueeze(1)  # chunk-local -> column
    top, pick = vals.reshape(rows, chunks * k).topk(k, dim=1, sorted=sorted)
    return top, idx.reshape(rows, chunks * k).gather(1, pick)


def fixed_shape_loss_and_grads(
    sae: DictionarySAE, x: torch.Tensor, dead_idx: torch.Tensor, n_dead: torch.Tensor, operand: Any, topk_chunks: int = 0
) -> tuple[torch.Tensor, ...]:
    """The loss and gradients of TopKSAE.loss_and_grads, in shapes fixed by x and dead_idx alone.

    dead_idx: [P] indices of the dead latents, padded (with index 0) to P = dead_bucket(n_dead); n_dead: the
    real count as a 0-d device tensor. Returns (gW_enc, gW_dec, gb_enc, gb_pre, stats, fired) with stats =
    [loss, fvu, l0, aux_fvu] and fired the bool mask of latents active in x."""
    cfg = sae.cfg
    W_enc, b_enc, W_dec, b_pre = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre
    B, n = x.shape[0], cfg.n_latents
    P = dead_idx.shape[0]
    k_main = 4 * cfg.k if cfg.multi_topk else cfg.k
    block_rows = ENCODE_BLOCK if x.device.type == "cpu" else B  # as the eager step: CPU blocks stay cache-sized
    xc = x - b_pre
    W_T, bias, xg = gemm_operand(W_enc, operand).T, gemm_operand(b_enc, operand), gemm_operand(xc, operand)
    if P:
        pad = torch.arange(P, device=x.device) >= n_dead  # padding columns: never among AuxK's top-k
    vals_parts, idx_parts, dead_parts = [], [], []
    for s in range(0, B, block_rows):
        block = torch.addmm(bias, xg[s : s + block_rows], W_T)
        if operand == "rounded":
            block = block.bfloat16().float()
        v, i = chunked_topk(block, k_main, cfg.multi_topk, topk_chunks)
        vals_parts.append(v.float())
        idx_parts.append(i)
        if P:
            dead_parts.append(block.index_select(1, dead_idx).masked_fill(pad, float("-inf")))
    vals_all, idx_all = torch.cat(vals_parts), torch.cat(idx_parts)
    denom = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)

    terms = [(cfg.k, 1.0)] + ([(4 * cfg.k, 1 / 8)] if cfg.multi_topk else [])
    loss = x.new_zeros(())
    per_term = []
    for k, weight in terms:
        vals, idx = vals_all[:, :k], idx_all[:, :k]
        z = vals.relu()
        x_hat = (W_dec[idx] * z.unsqueeze(2)).sum(1) + b_pre
        err = x - x_hat
        term = err.pow(2).sum() / denom
        loss = loss + weight * term
        g = err * (-2.0 * weight / denom)  # dLoss/dx_hat
        gz = (W_dec[idx] * g.unsqueeze(1)).sum(2) * (vals > 0)  # dLoss/dpre at the k selected latents
        per_term.append(
            (
                _per_latent_sum(idx, gz, xc, n),
                _per_latent_sum(idx, z, g, n),
                torch.zeros(n, dtype=gz.dtype, device=x.device).index_add_(0, idx.reshape(-1), gz.reshape(-1)),
                g.sum(0),
            )
        )
        if k == cfg.k:  # the first term: its statistics, and AuxK's target e = x - x_hat
            residual, fvu_k, l0 = err, term, (z > 0).sum() / B
            fired = torch.zeros(n, dtype=torch.float32, device=x.device).index_add_(0, idx.reshape(-1), (z > 0).float().reshape(-1)) > 0
    gW_enc, gW_dec, gb_enc, gb_pre = (parts[0] if len(parts) == 1 else parts[0] + parts[1] for parts in zip(*per_term))

    aux_fvu = x.new_zeros(())
    if P:
        pre_dead = torch.cat(dead_parts)
        aux_vals, aux_local = pre_dead.topk(min(cfg.k_aux, P), dim=1, sorted=False)
        e_var = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        Z = torch.zeros(B, P, dtype=aux_vals.dtype, device=x.device).scatter(1, aux_local, aux_vals.relu())
        W_dead = gemm_operand(W_dec[dead_idx], operand)
        aux_err = residual - gemm(Z, W_dead, operand)
        aux_fvu = aux_err.pow(2).sum() / e_var
        scale = cfg.aux_coef * torch.clamp(n_dead / cfg.k_aux, max=1.0)
        loss = loss + scale * aux_fvu
        g_aux = gemm_operand(aux_err * (-2.0 * scale / e_var), operand)
        gW_dec = gW_dec.index_add(0, dead_idx, gemm(Z.T, g_aux, operand).float())
        gz_aux = torch.gather(gemm(g_aux, W_dead.T, operand), 1, aux_local) * (aux_vals > 0)
        G = torch.zeros_like(Z).scatter(1, aux_local, gz_aux)
        gW_enc = gW_enc.index_add(0, dead_idx, gemm(G.T, xg, operand).float())
        gb_enc = gb_enc.index_add(0, dead_idx, G.sum(0, dtype=torch.float32))

    gb_pre = gb_pre - gb_enc @ W_enc  # b_pre enters the encoder as (x - b_pre)
    stats = torch.stack([loss, fvu_k, l0.float(), aux_fvu])
    return gW_enc, gW_dec, gb_enc, gb_pre, stats, fired


class CompiledTopK:
    """A drop-in for `sae.loss_and_grads` that runs `fixed_shape_loss_and_grads` through torch.compile.

    CUDA: mode "reduce-overhead" (inductor's Triton kernels replayed as CUDA graphs); the gradients it sets
    are the graph's output buffers, valid until the next call (the trainer's Adam step reads them before).
    CPU: inductor's C++ kernels, no graphs. The first call (and the first of each new dead-count bucket on
    CUDA) compiles or records, which takes seconds to a minute; every later one is a replay."""

    def __init__(self, sae: DictionarySAE, topk_chunks: int = 0):
        """topk_chunks: select the top k in two stages over this many column chunks (`chunked_topk`; 0: one
        torch.topk); it must divide n_latents into chunks of at least the k selected (4k with Multi-TopK)."""
        k_main = 4 * sae.cfg.k if sae.cfg.multi_topk else sae.cfg.k
        if topk_chunks > 1 and (sae.cfg.n_latents % topk_chunks or sae.cfg.n_latents // topk_chunks < k_main):
            raise ValueError(f"topk_chunks={topk_chunks} must divide n_latents={sae.cfg.n_latents} into chunks of at least {k_main}")
        self.topk_chunks = topk_chunks
        if not isinstance(sae, DictionarySAE) or type(sae).compiled_step is DictionarySAE.compiled_step:
            raise TypeError(f"CompiledTopK compiles the single-process TopKSAE step, not {type(sae).__name__}'s")
        self.sae = sae
        self._on_cuda: bool | None = None
        self._fn: Callable | None = None

    def _compiled(self, device_type: str) -> Callable:
        if self._fn is None:
            self._on_cuda = device_type == "cuda"
            # fullgraph: a graph break would silently bring back the launches this exists to remove
            mode = "reduce-overhead" if self._on_cuda else None
            self._fn = torch.compile(fixed_shape_loss_and_grads, mode=mode, fullgraph=True)
        return self._fn

    @torch.no_grad()
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """TopKSAE.loss_and_grads (same arguments, same statistics, same gradients up to summation order).
        Like it, it waits for the device twice: for the dead count (it sets the bucket) and for the statistics."""
        if group_sum is not None:
            raise ValueError("the compiled step trains one process; data-parallel ranks use the eager step")
        sae = self.sae
        fn = self._compiled(x.device.type)
        for p in sae.parameters():  # last step's gradients may be the graph's buffers this call overwrites
            p.grad = None
        dead_idx = dead.nonzero().squeeze(1) if sae.cfg.aux_coef else dead.new_zeros(0, dtype=torch.long)
        n_dead = len(dead_idx)
        dead_idx = nn.functional.pad(dead_idx, (0, dead_bucket(n_dead, sae.cfg.n_latents) - n_dead))
        n_dead_t = torch.full((), n_dead, dtype=torch.float32, device=x.device)
        operand = bf16_gemm(autocast_bf16, x.device.type)
        if self._on_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are free to overwrite
        try:
            gW_enc, gW_dec, gb_enc, gb_pre, stats, fired = fn(sae, x, dead_idx, n_dead_t, operand, self.topk_chunks)
        except torch._dynamo.exc.TorchDynamoException as e:  # compiling failed (no C++ compiler, no Triton, a graph break)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SaescopeError(f"--compile: torch.compile could not compile the training step ({first}); train without --compile") from e
        sae.W_enc.grad, sae.W_dec.grad, sae.b_enc.grad, sae.b_pre.grad = gW_enc, gW_dec, gb_enc, gb_pre
        loss, fvu_k, l0, aux_fvu = stats.tolist()
        return StepLosses(loss=loss, fvu=fvu_k, aux_fvu=aux_fvu, l0=l0, n_dead=n_dead, fired=fired)
