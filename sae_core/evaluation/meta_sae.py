"""The decoder's meta-structure: a small TopK SAE trained on the SAE's decoder rows (Bussmann et al.
2024, "Showing SAE Latents Are Not Atomic Using Meta-SAEs"; SAEBench lists a meta-SAE among its
structure evals).

Each decoder row (unit norm) is a training example; the meta-SAE has `latents` meta-latents (a quarter
of the SAE's by default) and reconstructs each row from `k` of them (4, as the paper's). Its FVU over
all rows says how far the decoder's directions are sums of fewer shared directions: near 0, the
latents are combinations of a smaller basis (not atomic); near 1, each direction is its own. The
share of rows reconstructed to cosine > 0.7 is reported beside it. Trained with saescope's own TopK
step (sae/topk.py: the same sparse backward, AuxK against dead meta-latents, Adam, unit-norm decoder
as `saescope train`), on the CPU, seeded; SAEBench's meta_structure eval trains a BatchTopK meta-SAE
with the same width ratio (1/4), k (4), steps (1500), batch (1024) and learning rate (5e-4), and reports
1 - this FVU as decoder_fraction_variance_explained.
"""

from __future__ import annotations

import time

import torch

from ..sae.topk import TopKConfig, TopKSAE

DECOMPOSED_COSINE = 0.7


def train_meta_sae(rows: torch.Tensor, latents: int, k: int, steps: int, seed: int, batch: int = 1024, lr: float = 5e-4) -> TopKSAE:
    """A TopK SAE with `latents` latents and `k` active, trained on `rows` [n, d] for `steps` Adam steps."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # AuxK's and the SAE's own draws
    rows = rows.float().cpu()
    meta = TopKSAE(TopKConfig(d_in=rows.shape[1], n_latents=latents, k=k))
    meta.reset_parameters(generator=gen)
    with torch.no_grad():
        meta.b_pre.copy_(rows.mean(0))
    opt = torch.optim.Adam(meta.parameters(), lr=lr)
    since_fired = torch.zeros(latents, dtype=torch.long)
    dead_after = 10 * len(rows)  # a meta-latent silent for ten passes over the rows is dead
    batch = min(batch, len(rows))
    for _ in range(steps):
        x = rows[torch.randint(len(rows), (batch,), generator=gen)]
        opt.zero_grad(set_to_none=True)
        stats = meta.loss_and_grads(x, since_fired >= dead_after)
        meta.remove_parallel_grads()
        opt.step()
        meta.normalize_decoder()
        since_fired += batch
        since_fired.masked_fill_(stats.fired.cpu(), 0)
    return meta


@torch.no_grad()
def meta_sae_metrics(W_dec: torch.Tensor, latents: int, k: int, steps: int, seed: int) -> tuple[dict[str, float], dict]:
    rows = W_dec.detach().float().cpu()
    latents = latents or max(k + 1, len(rows) // 4)
    start = time.perf_counter()
    with torch.enable_grad():
        meta = train_meta_sae(rows, latents, k, steps, seed)
    train_seconds = time.perf_counter() - start
    x_hat = meta(rows)
    err = (rows - x_hat).pow(2).sum()
    fvu = float(err / (rows - rows.mean(0)).pow(2).sum())
    cos = torch.nn.functional.cosine_similarity(rows, x_hat, dim=1)
    z = meta.encode(rows)
    used = (z > 0).any(0)
    metrics = {
        "meta_sae_fvu": fvu,
        "meta_sae_decomposed_fraction": float((cos > DECOMPOSED_COSINE).float().mean()),
        "meta_sae_latents": float(latents),
        "meta_sae_k": float(k),
    }
    details = {
        "steps": steps,
        "train_time_seconds": train_seconds,
        "mse": float(err) / rows.numel(),
        "meta_latents_used": int(used.sum()),
        "mean_cosine": float(cos.mean()),
        "cosine_quantiles": {str(q): float(cos.quantile(q)) for q in (0.1, 0.5, 0.9)},
    }
    return metrics, details
