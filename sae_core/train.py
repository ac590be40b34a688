"""Train an SAE on an activation cache, or on activations streamed from the model: `saescope train`.

One step: scale the batch to unit mean squared norm, compute loss and gradients (the SAE's own
`loss_and_grads`), drop the decoder gradients' parallel components, Adam, renormalise the decoder,
update the dead-latent counters and the weight EMA. Checkpoints are written atomically every
`checkpoint_every` steps; `resume=True` continues from the last one and ends with the same
weights, bit for bit on the CPU at the same thread count, as a run that was never interrupted
(across thread counts too with MKL_CBWR=AUTO,STRICT and fp32 numerics: docs/deployment.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import ActivationCache
from .config import TrainConfig
from .distributed.checkpoint import load_slice, save_sliced
from .distributed.comms import Comms, Grid, device_for, single_process
from .distributed.data_parallel import reduce_step
from .errors import SaescopeError
from .hardware import keep_large_buffers
from .model import resolve_device
from .sae import ARCHITECTURES
from .sae.base import DictionaryParameters, DictionarySAE, StepFn
from .stream import ModelStream

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    final: dict  # last step's fvu, l0, dead fraction, loss (StepResult.stats(): as train_log.jsonl records them)
    tokens_per_s: float
    resumed_from_step: int = 0
    log: list[dict] = field(default_factory=list)
    last: StepResult | None = None  # the last step this run made (None: the checkpoint was already at the end)


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


def build_sae(cfg: TrainConfig, d_in: int, latent_group: Comms | None = None) -> DictionaryParameters:
    """The SAE `cfg` describes; with a latent-parallel group of several ranks, this rank's slice of it."""
    if cfg.architecture not in ARCHITECTURES:
        raise SaescopeError(f"unknown architecture {cfg.architecture!r}: choose from {', '.join(ARCHITECTURES)}")
    config_cls, sae_cls = ARCHITECTURES[cfg.architecture]
    if any(f.name == "k" for f in dataclasses.fields(config_cls)) and cfg.k >= cfg.n_latents:
        raise SaescopeError(f"k ({cfg.k}) must be smaller than n_latents ({cfg.n_latents})")
    # each architecture's config takes the training options of its own field names (k, l0_coef, prefix_sizes, ...);
    # its fields without an option keep their defaults
    names = {f.name for f in dataclasses.fields(config_cls)} & {f.name for f in dataclasses.fields(cfg)}
    arch_cfg = config_cls(d_in=d_in, **{name: getattr(cfg, name) for name in names})
    if latent_group is not None and latent_group.size > 1:
        from .distributed.latent_parallel import sharded

        return sharded(sae_cls, arch_cfg, latent_group)  # an error for the architectures that do not split
    return sae_cls(arch_cfg)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class StepResult:
    """What one optimiser step reports (the dead fraction only every `LOG_EVERY` steps: reading it waits for a GPU)."""

    step: int  # steps done, this one included
    loss: float
    fvu: float
    aux_fvu: float  # AuxK's normalised error (0 without AuxK or for the ReLU baseline)
    l0: float
    n_dead: int
    dead_fraction: float | None = None

    def stats(self) -> dict:
        """The statistics as train_log.jsonl and TrainResult.final record them."""
        out = {"loss": self.loss, "fvu": self.fvu, "aux_fvu": self.aux_fvu, "l0": self.l0, "n_dead": self.n_dead}
        return out if self.dead_fraction is None else {**out, "dead_fraction": self.dead_fraction}


LOG_EVERY = 10


class Trainer:
    """One training run: the SAE, its optimiser and dead-latent counters, built fresh or resumed from
    `out`'s checkpoint. `step(x)` trains on one raw batch; `checkpoint()` writes the state atomically;
    `run()` drives the whole schedule and saves the SAE folder.

    Under torchrun `grid` spreads the run (sae_core/distributed): each data-parallel rank trains on its
    share of the activations with batch_size / dp_size rows of every global batch, each latent-parallel
    rank holds a slice of the latents; the default is one process, whose path no reduction touches."""

    def __init__(
        self,
        cfg: TrainConfig,
        activations: Path | ModelStream,
        out: Path,
        resume: bool = False,
        grid: Grid | None = None,
        resume_state: dict | None = None,
    ):
        keep_large_buffers()  # the step's encoder blocks would otherwise be mapped afresh each time
        self.cfg, self.out = cfg, Path(out)
        self.grid = grid = grid or single_process()
        full = activations if isinstance(activations, ModelStream) else ActivationCache(activations)
        if cfg.batch_size % grid.dp.size:
            raise SaescopeError(f"--batch-size {cfg.batch_size} must be a multiple of the {grid.dp.size} data-parallel ranks")
        self.batch_size = cfg.batch_size // grid.dp.size  # this rank's rows of each global batch
        self.source = source = full if grid.dp.size == 1 else full.share(grid.dp.rank, grid.dp.size)
        if self.batch_size <= 0 or self.batch_size > source.n_rows:
            raise SaescopeError(f"--batch-size must be between 1 and the cache's {source.n_rows} rows")
        total_tokens = cfg.tokens or source.batches_per_pass(self.batch_size) * cfg.batch_size  # default: one pass
        self.total_steps = max(1, total_tokens // cfg.batch_size)
        self.dead_tokens = cfg.dead_tokens or min(10_000_000, max(total_tokens // 10, cfg.batch_size))
        self.ckpt_path = self.out / CHECKPOINT
        self.device = device = resolve_device(device_for(cfg.device, grid))
        torch.manual_seed(cfg.seed)
        self.sae = sae = build_sae(cfg, source.d_model, grid.lp).to(device)
        self.lr = cfg.lr or sae.lr_default()
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.lr, eps=cfg.adam_eps, fused=True)  # fused: 5x faster step on CPU
        self.loss_and_grads = self._loss_and_grads(cfg, grid)
        self.step_no = self.start_step = 0
        self.tokens_since_fired = torch.zeros(len(sae.b_enc), dtype=torch.long, device=device)  # this rank's latents
        self.ema_state: dict | None = None
        self.meta = {
            "activations": "streamed from the model" if full is activations else str(Path(str(activations)).resolve()),
            "cache": full.config,
            "cache_windows": full.n_windows,
            "d_in": source.d_model,
        }
        if resume_state is not None:  # a run of several SAEs keeps their states in one checkpoint (train_transcoders.py)
            self._resume(resume_state)
        elif resume and self.ckpt_path.exists():
            self._resume()
        else:
            if self.out.exists() and any(self.out.iterdir()) and not resume:
                raise SaescopeError(f"{self.out} is not empty; pass --resume to continue its run, or choose another --out")
            self._initialise()
        grid.world.barrier()  # every rank has looked at --out before any writes into it
        self.out.mkdir(parents=True, exist_ok=True)

    def _loss_and_grads(self, cfg: TrainConfig, grid: Grid) -> StepFn:
        """The SAE's own loss_and_grads, or with --compile the same step as one compiled graph (sae/compiled.py)."""
        if not cfg.compile:
            return self.sae.loss_and_grads
        compiled = self.sae.compiled_step() if isinstance(self.sae, DictionarySAE) and not grid.distributed else None
        if compiled is None:
            which = ", ".join(name for name, (_, cls) in ARCHITECTURES.items() if cls.compiled_step is not DictionarySAE.compiled_step)
            raise SaescopeError(f"--compile compiles the {which} architecture's step in one process; leave it off for others and torchrun")
        return compiled

    def _initialise(self) -> None:
        cfg, sae = self.cfg, self.sae
        sample = self.source.sample(min(16384, self.source.n_rows), seed=cfg.seed)
        sample = sample[torch.isfinite(sample).all(1)]  # bad rows are reported by the batch that holds them
        self.scale = estimate_scale(sample)
        # a latent-parallel rank draws its own slice (so no rank ever holds the whole dictionary)
        gen = torch.Generator().manual_seed(cfg.seed if self.grid.lp.size == 1 else cfg.seed * 1_000_003 + self.grid.lp.rank)
        with torch.no_grad():
            if cfg.tied_init:
                sae.reset_parameters(gen)
            else:
                sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(sae.W_dec.shape, generator=gen), dim=1))
                sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=gen) / self.source.d_model**0.5)
            if cfg.geometric_median_init:
                sae.b_pre.copy_(geometric_median(sae.bias_init_rows(sample[:4096]) * self.scale))
        if self.grid.distributed:  # every rank starts from rank 0's scale and b_pre, and its group's slice
            self.scale = float(self.grid.world.broadcast_(torch.tensor([self.scale], dtype=torch.float64, device=self.device)).item())
            self.grid.world.broadcast_(sae.b_pre.data)
            for p in (sae.W_enc, sae.b_enc, sae.W_dec):
                self.grid.dp.broadcast_(p.data)
        if cfg.ema:
            self.ema_state = {k: v.clone() for k, v in sae.state_dict().items()}

    def _resume(self, state: dict | None = None) -> None:
        cfg, d_model = self.cfg, self.source.d_model
        if state is None:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)  # a GPU run's checkpoint resumes anywhere
        if state["config"] != cfg.identity() or state["d_in"] != d_model:
            diff = [k for k, v in cfg.identity().items() if state["config"].get(k) != v]
            if state["d_in"] != d_model:
                diff.append(f"d_in {state['d_in']} vs the cache's {d_model}")
            raise SaescopeError(
                f"{self.ckpt_path} is a checkpoint of another configuration ({', '.join(diff)}); "
                f"resume with the same options or choose another --out"
            )
        was, now = state.get("world", {"world_size": 1, "latent_parallel": 1}), self.grid.layout()
        if was != now:
            raise SaescopeError(
                f"{self.ckpt_path} was written by {was['world_size']} rank(s) with --latent-parallel {was['latent_parallel']}, "
                f"this run has {now['world_size']} with --latent-parallel {now['latent_parallel']}; resume with the same "
                f"torchrun --nnodes x --nproc-per-node and --latent-parallel"
            )
        part = state if "slices" not in state else load_slice(self.out, state, self.grid)
        self.sae.load_state_dict(part["sae"])  # load_state_dict copies onto the SAE's device
        self.opt.load_state_dict(part["opt"])
        self.tokens_since_fired = part["tokens_since_fired"].to(self.device)
        self.ema_state = None if part["ema"] is None else {k: v.to(self.device) for k, v in part["ema"].items()}
        self.scale = state["scale"]
        self.step_no = self.start_step = state["step"]
        log = self.out / LOG
        if log.exists() and self.grid.is_main:  # drop log lines written after the checkpoint by the interrupted run
            kept = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= self.step_no]
            log.write_text("".join(ln + "\n" for ln in kept))

    def checkpoint_state(self) -> dict:
        """One process's whole training state, as `checkpoint` writes it and `_resume` reads it."""
        meta = {"config": self.cfg.identity(), "d_in": self.source.d_model, "scale": self.scale, "step": self.step_no}
        return {**meta, **self._state_part(), "world": self.grid.layout()}

    def _state_part(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "ema": self.ema_state,
        }

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; with latent parallelism each slice's state goes to a file of its
        own first, and the checkpoint names the slices once all are written (distributed/checkpoint.py)."""
        part = self._state_part()
        meta = {"config": self.cfg.identity(), "d_in": self.source.d_model, "scale": self.scale, "step": self.step_no}
        if self.grid.lp.size > 1:
            save_sliced(self.ckpt_path, {**meta, "world": self.grid.layout()}, part, self.grid, self.step_no, _save_checkpoint)
        elif self.grid.is_main:
            _save_checkpoint(self.ckpt_path, self.checkpoint_state())

    def step(self, raw: torch.Tensor, where: str = "") -> StepResult:
        """One optimiser step on a batch of raw activations; `where` names the batch in errors."""
        cfg, sae = self.cfg, self.sae
        x = raw * self.scale
        dead = self.tokens_since_fired >= self.dead_tokens
        sae.begin_step(self.step_no)  # JumpReLU's L0 warm-up
        stats = self.loss_and_grads(x, dead, autocast_bf16=cfg.bf16, group_sum=self.grid.dp.group_sum)
        stats = reduce_step(list(sae.parameters()), stats, self.grid.dp)  # one process: as it is
        if not math.isfinite(stats.loss):  # a NaN or Inf in the batch always shows here (FVU's denominator)
            if not torch.isfinite(x).all():
                raise SaescopeError(
                    f"{where}(step {self.step_no}) holds NaN or Inf activations; "
                    f"training stopped, the last good checkpoint in {self.out} is kept"
                )
            raise SaescopeError(
                f"the loss became {stats.loss} at step {self.step_no} ({where.strip()}); "
                f"training stopped, the last good checkpoint in {self.out} is kept; try a lower --lr"
            )
        sae.remove_parallel_grads()
        self.opt.step()
        sae.normalize_decoder()
        self.tokens_since_fired += len(x) * self.grid.dp.size  # the global batch's tokens
        self.tokens_since_fired.masked_fill_(stats.fired, 0)
        if self.ema_state is not None and cfg.ema is not None:
            with torch.no_grad():
                for name, value in sae.state_dict().items():
                    self.ema_state[name].lerp_(value, 1 - cfg.ema)
        self.step_no += 1
        result = StepResult(self.step_no, stats.loss, stats.fvu, stats.aux_fvu, stats.l0, stats.n_dead)
        if self.step_no % LOG_EVERY == 0 or self.step_no == self.total_steps:
            result.dead_fraction = self._dead_fraction()
        return result

    def finish(self, stats: dict) -> None:
        """At the end of training: the EMA weights in place (where kept), the training record in the metadata."""
        if self.ema_state is not None:
            self.sae.load_state_dict(self.ema_state)
        self.meta["training"] = {
            **self.cfg.identity(),
            "lr": self.lr,
            "dead_tokens": self.dead_tokens,
            "input_scale": self.scale,
            "steps": self.step_no,
            "tokens_trained": self.step_no * self.cfg.batch_size,
            "final": stats,
        }

    def _dead_fraction(self) -> float:
        dead = self.tokens_since_fired >= self.dead_tokens
        if self.grid.lp.size == 1:
            return float(dead.float().mean())
        return float(self.grid.lp.sum(dead.sum().reshape(1)).item()) / self.cfg.n_latents

    def run(self, progress: bool = True) -> TrainResult:
        """Train to the end of the schedule, logging and checkpointing; then save the SAE folder."""
        from .interchange import save_sae

        cfg = self.cfg
        steps_per_epoch = self.source.batches_per_pass(self.batch_size)
        if steps_per_epoch == 0:
            raise SaescopeError(f"--batch-size {cfg.batch_size} leaves no whole batch in one pass over the activations")
        bar = tqdm(
            total=self.total_steps * cfg.batch_size,
            initial=self.step_no * cfg.batch_size,
            unit="tok",
            unit_scale=True,
            desc=f"training {cfg.architecture} n={cfg.n_latents}",
            disable=not progress or not self.grid.is_main,
            dynamic_ncols=True,
        )
        stats: dict = {}
        last: StepResult | None = None
        log: list[dict] = []
        t0, trained = time.perf_counter(), 0
        with open(self.out / LOG if self.grid.is_main else os.devnull, "a") as log_fh:
            while self.step_no < self.total_steps:
                epoch, skip = divmod(self.step_no, steps_per_epoch)
                # resuming inside an epoch: the order is seeded, so the source skips what was done
                batches = self.source.batches(self.batch_size, seed=cfg.seed + epoch, skip=skip, device=self.device)
                for batch_no, x in enumerate(batches, start=skip):
                    if self.step_no >= self.total_steps:
                        break
                    result = last = self.step(x, where=f"batch {batch_no} of epoch {epoch} ")
                    stats = result.stats()
                    trained += len(x) * self.grid.dp.size
                    bar.update(len(x) * self.grid.dp.size)
                    if result.dead_fraction is not None:
                        bar.set_postfix(fvu=f"{result.fvu:.3f}", l0=f"{result.l0:.1f}", dead=f"{result.dead_fraction:.1%}")
                        entry = {"step": result.step, "tokens": result.step * cfg.batch_size, **{k: round(v, 6) for k, v in stats.items()}}
                        log.append(entry)
                        log_fh.write(json.dumps(entry) + "\n")
                    if self.step_no % cfg.checkpoint_every == 0 or self.step_no == self.total_steps:
                        log_fh.flush()
                        self.checkpoint()
        bar.close()
        elapsed = time.perf_counter() - t0
        self.finish(stats)
        whole = self.sae.gather()  # a latent-parallel slice gathers its group's (every rank of it takes part)
        if self.grid.is_main:
            save_sae(whole, self.out, scale=self.scale, metadata=self.meta)
        return TrainResult(
            self.out, self.step_no, self.step_no * cfg.batch_size, stats, trained / elapsed if elapsed else 0.0, self.start_step, log, last
        )


def train(
    cfg: TrainConfig, activations: Path | ModelStream, out: Path, resume: bool = False, progress: bool = True, grid: Grid | None = None
) -> TrainResult:
    """Train on the cache folder `activations` (or a ModelStream), writing checkpoints and the final
    SAE folder to `out`; `grid`: this process's place among torchrun's ranks."""
    return Trainer(cfg, activations, out, resume, grid).run(progress)
