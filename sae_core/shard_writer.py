"""The resumable sharded writer behind `saescope cache` and the miner's code chunks, and the folder
format it writes (read back by cache.ActivationCache for activations, by feature_stats for codes).

A folder holds `cache.json` (what it is of and how far it got), `documents.json` (document ids that
`doc_index` values index) and `shard_NNNNN.safetensors` files: per shard, what the encoder stores for
each position (activations for a cache, SAE codes for the miner) plus `tokens`, `doc_index` and
`doc_offset` [windows, context_size]. Each shard holds `windows_per_shard` windows (the last may hold
fewer) and appears atomically (written to a temporary name, fsynced, renamed), so a killed run leaves
only whole shards; a re-run of the same command counts them and continues after them. Windows come in
a fixed order (windows.WindowSource), so the result equals an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .errors import SaescopeError

if TYPE_CHECKING:
    from .config import CacheConfig
    from .model import LanguageModel
    from .windows import WindowSource

MANIFEST = "cache.json"
DOCUMENTS = "documents.json"


@dataclass
class CacheResult:
    """What a run of the writer left in `out`: the result of `saescope cache` (cache.build_cache) and of
    the miner's code chunks alike."""

    out: Path
    n_windows: int
    n_rows: int
    d_model: int
    complete: bool
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)


def shard_path(out: Path, i: int) -> Path:
    return out / f"shard_{i:05d}.safetensors"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def existing_windows(out: Path, windows_per_shard: int) -> tuple[int, int]:
    """(whole full shards on disk, windows in them). A trailing short shard is dropped: it is redone."""
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    n = 0
    while shard_path(out, n).exists():
        with safe_open(str(shard_path(out, n)), "pt") as f:
            if int(f.metadata()["n_windows"]) != windows_per_shard:
                break
        n += 1
    for stale in sorted(out.glob("shard_*.safetensors"))[n:]:
        stale.unlink()
    return n, n * windows_per_shard


def check_folder(out: Path, cfg: CacheConfig, encoder_identity: dict) -> dict | None:
    """The existing manifest if `out` holds a cache of the same identity; an error if of another."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        if out.exists() and any(out.iterdir()):
            raise SaescopeError(f"{out} is not empty and holds no activation cache; choose another --out")
        return None
    old = json.loads(manifest_path.read_text())
    diff = {k: (old["config"].get(k), v) for k, v in cfg.identity().items() if old["config"].get(k) != v}
    if diff:
        what = ", ".join(f"{k} {a!r} (asked {b!r})" for k, (a, b) in diff.items())
        raise SaescopeError(f"{out} holds a cache of another configuration: {what}; choose another --out")
    if old.get("encoder", {}) != encoder_identity:
        raise SaescopeError(f"{out} was written for another SAE or settings ({old.get('encoder')}); choose another folder")
    if old["config"]["windows_per_shard"] != cfg.windows_per_shard:
        raise SaescopeError(f"{out} was written with --windows-per-shard {old['config']['windows_per_shard']}; resume with the same value")
    return old


class ShardEncoder:
    """What a shard stores per batch of residuals. The default stores the activations themselves; the
    miner subclasses it to store SAE codes instead, reusing the cache's resumable sharded writer."""

    identity: dict = {}  # recorded in the manifest; a resume with another identity is refused

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def bytes_per_row(self, d_model: int) -> int:
        return d_model * torch.empty(0, dtype=self.dtype).element_size()

    def __call__(self, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        """acts [windows, positions, d_model] -> tensors with one row per position, concatenated per shard."""
        return {"activations": acts.reshape(-1, acts.shape[-1]).to("cpu", self.dtype)}


def finished(cfg: CacheConfig, out: Path, encoder: ShardEncoder) -> tuple[dict | None, CacheResult | None]:
    """(the folder's manifest or None, a result when it already holds everything asked for). Refuses a
    folder of another configuration or encoder, before any model is loaded."""
    old = check_folder(Path(out), cfg, encoder.identity)
    if old and old["complete"] and (old["n_windows"] >= cfg.n_windows or old.get("corpus_exhausted")):
        rows = old["n_windows"] * (cfg.context_size - cfg.skip_positions)
        return old, CacheResult(
            Path(out),
            old["n_windows"],
            rows,
            old["d_model"],
            True,
            resumed_from=old["n_windows"],
            notes=[f"{out} already holds this cache ({old['n_windows']} windows); nothing to do"],
        )
    return old, None


def fill_shards(
    cfg: CacheConfig,
    out: Path,
    old: dict | None,
    lm: LanguageModel,
    documents: list[str],
    source_at: Callable[[int], WindowSource],
    encoder: ShardEncoder,
    progress: bool = True,
    desc: str = "caching",
) -> CacheResult:
    """Write the shards of windows `done..cfg.n_windows` into `out` (after the whole shards it holds):
    `source_at(done)` gives the WindowSource starting there, `encoder` what each position stores."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards, done = existing_windows(out, cfg.windows_per_shard)
    target = cfg.n_windows
    result = CacheResult(out, done, 0, lm.d_model, False, resumed_from=done)
    rows_per_window = cfg.context_size - cfg.skip_positions
    need = max(target - done, 0) * rows_per_window * encoder.bytes_per_row(lm.d_model)
    free = shutil.disk_usage(out).free
    if need > free:
        raise SaescopeError(f"not enough disk space in {out}: the cache needs {need / 2**30:.2f} GiB more, {free / 2**30:.2f} GiB free")

    write_json(out / DOCUMENTS, documents)
    manifest = {
        "config": asdict(cfg),
        "d_model": lm.d_model,
        "n_windows": done,
        "complete": False,
        "model_dtype": str(lm.dtype).removeprefix("torch."),
        "tokenizer_eos": lm.eos_token_id,
        "encoder": encoder.identity,
    }
    if old is None or old["n_windows"] != done:
        write_json(out / MANIFEST, manifest)

    source: WindowSource = source_at(done)
    bar = tqdm(
        total=target * cfg.context_size,
        initial=done * cfg.context_size,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    )
    writer = ThreadPoolExecutor(max_workers=1)  # overlap disk writes with the next forward passes
    pending: Future | None = None
    exhausted = False
    try:
        while done < target and not exhausted:
            n_this = min(cfg.windows_per_shard, target - done)
            shard_tok, shard_doc, shard_off, shard_enc = [], [], [], []
            n_win = 0
            while n_win < n_this:
                batch = source.take(min(cfg.batch_size, n_this - n_win))
                if batch is None:
                    exhausted = True
                    break
                shard_enc.append(encoder(batch.acts))
                shard_tok.append(batch.tokens)
                shard_doc.append(batch.doc_index)
                shard_off.append(batch.doc_offset)
                n_win += len(batch)
                bar.update(len(batch) * cfg.context_size)
            if not shard_tok:
                break
            tensors = {name: torch.cat([e[name] for e in shard_enc]) for name in shard_enc[0]}
            tensors |= {
                "tokens": torch.from_numpy(np.concatenate(shard_tok)),
                "doc_index": torch.from_numpy(np.concatenate(shard_doc)),
                "doc_offset": torch.from_numpy(np.concatenate(shard_off)),
            }
            if pending is not None:
                pending.result()
            pending = writer.submit(write_shard, shard_path(out, n_shards), tensors, {"n_windows": str(n_win), "first_window": str(done)})
            n_shards += 1
            done += n_win
        if pending is not None:
            pending.result()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SaescopeError(
                f"disk full while writing {out}; the whole shards written so far are kept: free space and re-run the same command"
            ) from exc
        raise
    finally:
        writer.shutdown(wait=True)
        bar.close()

    if exhausted:
        result.notes.append(f"the corpus ended after {done} windows ({done * cfg.context_size} tokens); asked for {cfg.tokens} tokens")
    manifest.update(n_windows=done, complete=True, corpus_exhausted=exhausted)
    write_json(out / MANIFEST, manifest)
    result.n_windows, result.n_rows, result.complete = done, done * rows_per_window, True
    return result
