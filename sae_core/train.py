"""Train an SAE on an activation cache, or on activations streamed from the model: `saescope train`.

One step: scale the batch to unit mean squared norm, compute loss and gradients (the SAE's own
`loss_and_grads`), drop the decoder gradients' parallel components, Adam, renormalise the decoder,
update the dead-latent counters and the weight EMA. Checkpoints are written atomically every
`checkpoint_every` steps; `resume=True` continues from the last one and ends with the same
weights, bit for bit on the CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import ActivationCache
from .stream import ModelStream
from .errors import SaescopeError
from .hardware import keep_large_buffers
from .model import resolve_device
from .sae import ARCHITECTURES

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Everything `saescope train` takes. Fields marked identity must match to resume."""

    architecture: str = "topk"      # identity: topk or relu
    n_latents: int = 16384          # identity
    k: int = 32                     # identity (topk): active latents per token
    k_aux: int | None = None        # identity (topk): AuxK latents, default d_in // 2
    aux_coef: float = 1 / 32        # identity (topk): AuxK weight; 0 turns AuxK off
    multi_topk: bool = False        # identity (topk): add L(4k)/8
    l1_coef: float = 1e-2           # identity (relu): L1 penalty
    tied_init: bool = True          # identity: W_enc = W_dec^T at init (else independent random)
    geometric_median_init: bool = True  # identity: b_pre from the geometric median of a sample
    lr: float | None = None         # identity: default 2e-4 / sqrt(n_latents / 2^14)
    adam_eps: float = 6.25e-10      # identity
    batch_size: int = 4096          # identity: tokens per step
    tokens: int | None = None       # identity: training tokens (default: one pass over the cache)
    dead_tokens: int | None = None  # identity: tokens without firing before a latent counts as dead (default min(10M, tokens/10))
    ema: float | None = None        # identity: weight EMA decay (e.g. 0.999); saved weights are the EMA
    bf16: bool = False              # identity: encoder (and TopK's AuxK) matmuls in bf16 numerics (sae/base.py bf16_gemm)
    seed: int = 0                   # identity
    checkpoint_every: int = 200     # steps between checkpoints
    device: str = "auto"            # auto: CUDA when present, else the CPU (bitwise resumable on the CPU)

    NOT_IDENTITY = ("checkpoint_every", "device")

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.NOT_IDENTITY}


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    final: dict                                  # last step's fvu, l0, dead fraction, loss
    tokens_per_s: float
    resumed_from_step: int = 0
    log: list[dict] = field(default_factory=list)


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points`."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


def estimate_scale(sample: torch.Tensor) -> float:
    """One scalar making inputs unit mean squared norm; outlier rows (norm > 10x median) are ignored."""
    norms = sample.norm(dim=1)
    keep = norms <= 10 * norms.median()
    return float(1 / sample[keep].pow(2).sum(1).mean().sqrt())


def build_sae(cfg: TrainConfig, d_in: int):
    if cfg.architecture not in ARCHITECTURES:
        raise SaescopeError(f"unknown architecture {cfg.architecture!r}: choose from {', '.join(ARCHITECTURES)}")
    if cfg.architecture == "topk":
        if cfg.k >= cfg.n_latents:
            raise SaescopeError(f"k ({cfg.k}) must be smaller than n_latents ({cfg.n_latents})")
        arch_cfg = ARCHITECTURES["topk"][0](d_in=d_in, n_latents=cfg.n_latents, k=cfg.k, k_aux=cfg.k_aux,
                                            aux_coef=cfg.aux_coef, multi_topk=cfg.multi_topk)
    else:
        arch_cfg = ARCHITECTURES["relu"][0](d_in=d_in, n_latents=cfg.n_latents, l1_coef=cfg.l1_coef)
    return ARCHITECTURES[cfg.architecture][1](arch_cfg)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def train(cfg: TrainConfig, activations: Path | ModelStream, out: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train on the cache folder `activations` (or a ModelStream), writing checkpoints and the final
    SAE folder to `out`."""
    from .interchange import save_sae

    keep_large_buffers()        # the step's encoder blocks would otherwise be mapped afresh each time
    cache = activations if isinstance(activations, ModelStream) else ActivationCache(activations)
    if cfg.batch_size <= 0 or cfg.batch_size > cache.n_rows:
        raise SaescopeError(f"--batch-size must be between 1 and the cache's {cache.n_rows} rows")
    total_tokens = cfg.tokens or cache.batches_per_pass(cfg.batch_size) * cfg.batch_size   # default: one pass
    total_steps = max(1, total_tokens // cfg.batch_size)
    dead_tokens = cfg.dead_tokens or min(10_000_000, max(total_tokens // 10, cfg.batch_size))
    out = Path(out)
    ckpt_path = out / CHECKPOINT

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg, cache.d_model).to(device)
    lr = cfg.lr or sae.lr_default()
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=cfg.adam_eps, fused=True)  # fused: 5x faster step on CPU
    step, start_step = 0, 0
    tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
    ema_state = None
    meta = {"activations": "streamed from the model" if cache is activations else str(activations), "cache": cache.config, "cache_windows": cache.manifest["n_windows"], "d_in": cache.d_model}

    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)   # a GPU run's checkpoint resumes anywhere
        if state["config"] != cfg.identity() or state["d_in"] != cache.d_model:
            diff = [k for k, v in cfg.identity().items() if state["config"].get(k) != v]
            if state["d_in"] != cache.d_model:
                diff.append(f"d_in {state['d_in']} vs the cache's {cache.d_model}")
            raise SaescopeError(f"{ckpt_path} is a checkpoint of another configuration ({', '.join(diff)}); "
                                f"resume with the same options or choose another --out")
        sae.load_state_dict(state["sae"])  # load_state_dict copies onto the SAE's device
        opt.load_state_dict(state["opt"])
        tokens_since_fired = state["tokens_since_fired"].to(device)
        ema_state = None if state["ema"] is None else {k: v.to(device) for k, v in state["ema"].items()}
        scale = state["scale"]
        step = start_step = state["step"]
        if (out / LOG).exists():  # drop log lines written after the checkpoint by the interrupted run
            kept = [ln for ln in (out / LOG).read_text().splitlines() if json.loads(ln)["step"] <= step]
            (out / LOG).write_text("".join(ln + "\n" for ln in kept))
    else:
        if out.exists() and any(out.iterdir()) and not resume:
            raise SaescopeError(f"{out} is not empty; pass --resume to continue its run, or choose another --out")
        sample = cache.sample(min(16384, cache.n_rows), seed=cfg.seed)
        sample = sample[torch.isfinite(sample).all(1)]  # bad rows are reported by the batch that holds them
        scale = estimate_scale(sample)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            if cfg.tied_init:
                sae.reset_parameters(gen)
            else:
                sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(sae.W_dec.shape, generator=gen), dim=1))
                sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=gen) / cache.d_model ** 0.5)
            if cfg.geometric_median_init:
                sae.b_pre.copy_(geometric_median(sample[:4096] * scale))
        if cfg.ema:
            ema_state = {k: v.clone() for k, v in sae.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {"config": cfg.identity(), "d_in": cache.d_model, "sae": sae.state_dict(),
                                     "opt": opt.state_dict(), "tokens_since_fired": tokens_since_fired.cpu(),
                                     "ema": ema_state, "scale": scale, "step": step})

    bar = tqdm(total=total_steps * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
               desc=f"training {cfg.architecture} n={cfg.n_latents}", disable=not progress, dynamic_ncols=True)
    stats: dict = {}
    log: list[dict] = []
    t0, trained = time.perf_counter(), 0
    steps_per_epoch = cache.batches_per_pass(cfg.batch_size)
    if steps_per_epoch == 0:
        raise SaescopeError(f"--batch-size {cfg.batch_size} leaves no whole batch in one pass over the activations")
    with open(out / LOG, "a") as log_fh:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            # resuming inside an epoch: the order is seeded, so the source skips what was done
            for batch_no, x in enumerate(cache.batches(cfg.batch_size, seed=cfg.seed + epoch, skip=skip, device=device), start=skip):
                if step >= total_steps:
                    break
                x = x * scale
                stats = sae.loss_and_grads(x, tokens_since_fired >= dead_tokens, autocast_bf16=cfg.bf16)
                if not math.isfinite(stats["loss"]):   # a NaN or Inf in the batch always shows here (FVU's denominator)
                    if not torch.isfinite(x).all():
                        raise SaescopeError(f"batch {batch_no} of epoch {epoch} (step {step}) holds NaN or Inf activations; "
                                            f"training stopped, the last good checkpoint in {out} is kept")
                    raise SaescopeError(f"the loss became {stats['loss']} at step {step} (epoch {epoch}, batch {batch_no}); "
                                        f"training stopped, the last good checkpoint in {out} is kept; try a lower --lr")
                sae.remove_parallel_grads()
                opt.step()
                sae.normalize_decoder()
                tokens_since_fired += len(x)
                tokens_since_fired.masked_fill_(stats.pop("fired"), 0)
                if ema_state is not None:
                    with torch.no_grad():
                        for name, value in sae.state_dict().items():
                            ema_state[name].lerp_(value, 1 - cfg.ema)
                step += 1
                trained += len(x)
                bar.update(len(x))
                if step % 10 == 0 or step == total_steps:    # (reading the dead fraction waits for the GPU)
                    stats["dead_fraction"] = float((tokens_since_fired >= dead_tokens).float().mean())
                    bar.set_postfix(fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}", dead=f"{stats['dead_fraction']:.1%}")
                    entry = {"step": step, "tokens": step * cfg.batch_size, **{k: round(v, 6) for k, v in stats.items()}}
                    log.append(entry)
                    log_fh.write(json.dumps(entry) + "\n")
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    log_fh.flush()
                    checkpoint()
    bar.close()
    elapsed = time.perf_counter() - t0
    if ema_state is not None:
        sae.load_state_dict(ema_state)
    meta["training"] = {**cfg.identity(), "lr": lr, "dead_tokens": dead_tokens, "input_scale": scale,
                        "steps": step, "tokens_trained": step * cfg.batch_size, "final": stats}
    save_sae(sae, out, scale=scale, metadata=meta)
    return TrainResult(out, step, step * cfg.batch_size, stats, trained / elapsed if elapsed else 0.0, start_step, log)
