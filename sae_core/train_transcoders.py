"""Train a transcoder for each of several layers in one pass over the tokens: `saescope train --transcoders all|0,1,5`.

Each batch of windows goes through the model once; forward hooks on every chosen layer's MLP capture its
input (blocks.L.hook_mlp_in) and output (blocks.L.hook_mlp_out), and every layer's transcoder takes one
optimiser step on its (input, output) pairs. Each layer has its own `train.Trainer` (the same step, dead-latent
counters, EMA and resume logic as `saescope train`), fed by a `LayerView` of the shared `MLPStream`; their
states are checkpointed together, atomically, in one file, so a killed run resumes every layer at the same
step and ends with the weights an uninterrupted run ends with.

Scales: inputs and targets are scaled apart. A layer's targets are first multiplied by `ratio` (the input's
RMS over the output's on a sample) and the Trainer then scales the pair to unit mean squared norm by its
`scale`; the saved transcoder has these folded in (transcoder.fold_input_scale), so it takes and gives raw
activations.

Memory (CPU, fp32): per layer the parameters, two Adam moments and, while it steps, the gradients:
(2 n d + d^2 + n + d) floats x 3 + gradients. For SmolLM2-135M (30 layers, d = 576) at the default
n_latents = 4096 (TRANSCODER_LATENTS) with the skip term, 60 MB per layer, 1.8 GB for all 30, plus the
model (0.5 GB) and a shuffle group of GROUP_BATCHES batches of every layer's pairs (4096 rows x 30 x 1152
floats = 0.57 GB per batch).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from .config import CacheConfig, TrainConfig
from .errors import SaescopeError
from .interchange import save_sae
from .model import LanguageModel, load_model
from .sae import ARCHITECTURES, SkipTranscoderSAE, TranscoderSAE
from .sae.transcoder import mlp_in_hook
from .stream import ModelStream
from .train import CHECKPOINT, LOG, StepResult, Trainer, _save_checkpoint
from .windows import WindowSource

TRANSCODER_LATENTS = 4096  # default dictionary size per layer (see the module docstring for memory)
SAMPLE_ROWS = 2048  # rows of every layer's pairs for the scales and b_pre's initial value
SUMMARY = "transcoders.json"


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all` or comma-separated layer indices (ranges a-b allowed) -> sorted distinct layers, checked against the depth."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SaescopeError(f"--transcoders takes `all` or layers such as 0,1,5 or 0-7, not {spec!r}") from None
    if not layers:
        raise SaescopeError("--transcoders names no layer")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise SaescopeError(f"--transcoders: layer(s) {bad} past the model's depth (layers 0..{n_layers - 1})")
    return sorted(layers)


def transcoder_config(cfg: TrainConfig) -> TrainConfig:
    """The training options for a transcoder: a non-transcoder --architecture left at its default becomes the skip
    transcoder, --n-latents left at its default becomes TRANSCODER_LATENTS; another architecture is an error."""
    defaults = TrainConfig()
    changes: dict = {}
    entry = ARCHITECTURES.get(cfg.architecture)
    if entry is None or not issubclass(entry[1], TranscoderSAE):
        if cfg.architecture != defaults.architecture:
            names = [name for name, (_, cls) in ARCHITECTURES.items() if issubclass(cls, TranscoderSAE)]
            raise SaescopeError(f"--transcoders trains one of {', '.join(names)}; --architecture {cfg.architecture} is not a transcoder")
        changes["architecture"] = SkipTranscoderSAE.architecture
    if cfg.n_latents == defaults.n_latents:
        changes["n_latents"] = TRANSCODER_LATENTS
    return dataclasses.replace(cfg, **changes)


class MLPWindows(WindowSource):
    """Windows through the model once, capturing every chosen layer's MLP input and output:
    [windows, context, n_layers, 2 d] (each layer's pair side by side, as transcoder.pair)."""

    def __init__(self, layers: list[int], *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.layers = layers

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        acts = self.lm.mlp_activations(tokens, self.layers)
        return torch.stack([torch.cat(acts[layer], dim=-1) for layer in self.layers], dim=2)


class MLPStream(ModelStream):
    """The ModelStream's windows, order and shuffling, with rows of every layer's (MLP input, MLP output) pairs:
    a row is [n_layers * 2 d]. Shuffle groups are smaller than a single-hook stream's (the rows are wide)."""

    GROUP_BATCHES = 2

    def __init__(self, cfg: CacheConfig, layers: list[int], lm: LanguageModel | None = None):
        super().__init__(dataclasses.replace(cfg, hook=mlp_in_hook(layers[-1])), lm)  # the deepest layer: checked against the depth
        self.layers, self.width = layers, self.lm.d_model
        self.d_model = len(layers) * 2 * self.width  # the row width ModelStream reshapes to
        self._sample: torch.Tensor | None = None

    def _windows(self, start: int) -> WindowSource:
        return MLPWindows(self.layers, self.lm, self.corpus, self.cfg, start)

    def shared_sample(self) -> torch.Tensor:
        """SAMPLE_ROWS rows from the first windows, computed once for every layer ([rows, n_layers * 2 d])."""
        if self._sample is None:
            self._sample = ModelStream.sample(self, SAMPLE_ROWS)
        return self._sample

    def drop_sample(self) -> None:
        self._sample = None

    def pairs(self, rows: torch.Tensor, i: int, ratio: float) -> torch.Tensor:
        """Layer i's pairs in rows of the stream, targets times `ratio` (a new tensor)."""
        d = self.width
        out = rows[:, 2 * d * i : 2 * d * (i + 1)].clone()
        out[:, d:] *= ratio
        return out

    def view(self, i: int, ratio: float) -> LayerView:
        return LayerView(self, i, ratio)


class LayerView(ModelStream):
    """What one layer's Trainer sees of an MLPStream: its d_model is the MLP's width, its sample that layer's
    pairs, its config names that layer's MLP input as the hook (the saved transcoder's provenance, what
    `saescope mine` captures). The batches come from the shared stream (train_transcoders), not from here."""

    def __init__(self, stream: MLPStream, i: int, ratio: float):  # no ModelStream.__init__: it shares the stream's model
        self.stream, self.i, self.ratio = stream, i, ratio
        self.cfg = dataclasses.replace(stream.cfg, hook=mlp_in_hook(stream.layers[i]))
        self.lm, self.corpus, self.part = stream.lm, stream.corpus, stream.part
        self.d_model = stream.width
        self.rows_per_window, self.n_windows, self.n_rows = stream.rows_per_window, stream.n_windows, stream.n_rows
        self.config = {**self.cfg.identity(), "streamed": True}

    def sample(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.stream.pairs(self.stream.shared_sample()[:n], self.i, self.ratio).to(dtype)

    def batches(
        self, batch_size: int, seed: int = 0, skip: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Iterator[torch.Tensor]:
        raise SaescopeError("a layer's batches come from the shared stream of train_transcoders")

    def batches_per_pass(self, batch_size: int) -> int:
        return self.stream.batches_per_pass(batch_size)


def rms_ratio(sample: torch.Tensor, i: int, d: int) -> float:
    """Layer i's input RMS over its output RMS on the shared sample (targets times this match the inputs' scale)."""
    pairs = sample[:, 2 * d * i : 2 * d * (i + 1)]
    return float(pairs[:, :d].pow(2).mean().sqrt() / pairs[:, d:].pow(2).mean().sqrt().clamp_min(1e-12))


@dataclass
class TranscodersResult:
    out: Path
    layers: list[int]
    folders: dict[int, Path]
    steps: int
    tokens: int
    final: dict[int, dict]  # layer -> its last logged statistics (fvu, l0, dead fraction, ...), as train_log.jsonl has them
    tokens_per_s: float
    resumed_from_step: int = 0
    last: dict[int, StepResult] = field(default_factory=dict)  # layer -> its last logged step, typed (empty: nothing trained)


def train_transcoders(
    cfg: TrainConfig,
    stream_cfg: CacheConfig,
    layers: str | list[int],
    out: Path,
    resume: bool = False,
    progress: bool = True,
    lm: LanguageModel | None = None,
) -> TranscodersResult:
    """Train a transcoder for each of `layers` (`all`, "0,1,5" or a list) on stream_cfg.tokens tokens streamed from
    stream_cfg's model and corpus, one forward per batch for all of them; folders out/layer_<L>; resumable."""
    cfg = transcoder_config(cfg)
    if cfg.latent_parallel != 1:
        raise SaescopeError("--transcoders trains in one process (no torchrun, --latent-parallel 1)")
    out = Path(out)
    lm = lm or load_model(stream_cfg.model, stream_cfg.device, stream_cfg.model_dtype)
    chosen = parse_layers(layers, lm.n_layers) if isinstance(layers, str) else sorted(set(layers))
    stream = MLPStream(stream_cfg, chosen, lm)
    identity = {**stream.config, "tokens": stream_cfg.tokens}
    ckpt_path = out / CHECKPOINT
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume and ckpt_path.exists() else None
    if state is not None:
        if state["layers"] != chosen or state["stream"] != identity:
            raise SaescopeError(
                f"{ckpt_path} is a checkpoint of transcoders of layers {state['layers']} on {state['stream']}; "
                f"resume with the same --transcoders, --model, --corpus and --tokens or choose another --out"
            )
        ratios = state["ratios"]
    else:
        if out.exists() and any(out.iterdir()):
            raise SaescopeError(f"{out} is not empty; pass --resume to continue its run, or choose another --out")
        d = stream.width
        ratios = [rms_ratio(stream.shared_sample(), i, d) for i in range(len(chosen))]
    layer_cfg = dataclasses.replace(cfg, tokens=None)  # one pass over the stream
    trainers = [
        Trainer(
            layer_cfg,
            stream.view(i, ratios[i]),
            out / f"layer_{layer}",
            resume_state=None if state is None else state["trainers"][i],
        )
        for i, layer in enumerate(chosen)
    ]
    stream.drop_sample()
    for layer, trainer in zip(chosen, trainers):
        trainer.sae.cfg.layer = layer  # names the MLP hooks it is saved with (the training options do not hold it)
    out.mkdir(parents=True, exist_ok=True)
    if state is not None:  # drop log lines written after the checkpoint by the interrupted run
        log = out / LOG
        if log.exists():
            kept = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= state["step"]]
            log.write_text("".join(ln + "\n" for ln in kept))

    def checkpoint(step: int) -> None:
        _save_checkpoint(
            ckpt_path,
            {"layers": chosen, "stream": identity, "ratios": ratios, "step": step, "trainers": [t.checkpoint_state() for t in trainers]},
        )

    first = trainers[0]
    step, total, batch_size = first.step_no, first.total_steps, cfg.batch_size
    start_step = step
    steps_per_epoch = stream.batches_per_pass(batch_size)
    if steps_per_epoch == 0:
        raise SaescopeError(f"--batch-size {batch_size} leaves no whole batch in --tokens {stream_cfg.tokens}")
    bar = tqdm(
        total=total * batch_size,
        initial=step * batch_size,
        unit="tok",
        unit_scale=True,
        desc=f"training {len(chosen)} {cfg.architecture}s n={cfg.n_latents}",
        disable=not progress,
        dynamic_ncols=True,
    )
    final: dict[int, dict] = {}
    last: dict[int, StepResult] = {}
    t0 = time.perf_counter()
    with open(out / LOG, "a") as log_fh:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            for batch_no, rows in enumerate(stream.batches(batch_size, seed=cfg.seed + epoch, skip=skip), start=skip):
                if step >= total:
                    break
                results: list[StepResult] = []
                for i, trainer in enumerate(trainers):
                    pairs = stream.pairs(rows, i, ratios[i]).to(trainer.device)
                    results.append(trainer.step(pairs, where=f"layer {chosen[i]}, batch {batch_no} of epoch {epoch} "))
                    for p in trainer.sae.parameters():  # the next step sets them afresh: holding 30 layers' would cost memory
                        p.grad = None
                del rows
                step += 1
                bar.update(batch_size)
                if results[0].dead_fraction is not None:
                    entry: dict = {"step": step, "tokens": step * batch_size}
                    for layer, result in zip(chosen, results):
                        final[layer], last[layer] = result.stats(), result
                        entry[f"layer_{layer}"] = {k: round(v, 6) for k, v in final[layer].items()}
                    log_fh.write(json.dumps(entry) + "\n")
                    fvus = [r.fvu for r in results]
                    bar.set_postfix(fvu_mean=f"{sum(fvus) / len(fvus):.3f}", fvu_max=f"{max(fvus):.3f}")
                if step % cfg.checkpoint_every == 0 or step == total:
                    log_fh.flush()
                    checkpoint(step)
    bar.close()
    elapsed = time.perf_counter() - t0
    folders = {}
    for layer, trainer, ratio in zip(chosen, trainers, ratios):
        trainer.finish(final.get(layer, {}))
        sae = trainer.sae
        assert isinstance(sae, TranscoderSAE)
        # trained on (x * s, y * ratio * s): fold s / (ratio * s) into the encoder, save with the targets' scale
        sae.fold_input_scale(1 / ratio)
        trainer.meta["scales"] = {"input_scale": trainer.scale, "output_scale": trainer.scale * ratio}
        folders[layer] = save_sae(sae, out / f"layer_{layer}", scale=trainer.scale * ratio, metadata=trainer.meta)
    summary = {"layers": chosen, "folders": {str(k): str(v) for k, v in folders.items()}, "steps": step, "final": final}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    trained = (step - start_step) * batch_size
    return TranscodersResult(
        out, chosen, folders, step, step * batch_size, final, trained / elapsed if elapsed and trained else 0.0, start_step, last
    )


def layer_folders(out: Path) -> dict[int, Path]:
    """layer -> transcoder folder of a finished `train_transcoders` run."""
    summary = json.loads((Path(out) / SUMMARY).read_text())
    return {int(k): Path(v) for k, v in summary["folders"].items()}


__all__ = ["TRANSCODER_LATENTS", "MLPStream", "TranscodersResult", "layer_folders", "parse_layers", "train_transcoders"]
