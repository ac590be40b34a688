"""The activation cache stage: residual-stream activations of packed token windows, sharded on disk.

`build_cache` takes the windows from `windows.WindowSource` (model cut at the hook, sink positions
dropped) and writes them through `shard_writer.fill_shards`, the resumable writer the miner uses too: a
folder of `cache.json`, `documents.json` and `shard_NNNNN.safetensors` with `activations [rows,
d_model]` plus `tokens` / `doc_index` / `doc_offset` [windows, context_size], rows = windows *
(context_size - skip). `ActivationCache` is the read side: shuffled training batches, samples, and
the windows `saescope mine` reads back instead of running the model (`reusable_cache`): it is the one
reader of an activation cache's shards (windows.WindowSource reads cached windows through it).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from . import corpus as corpus_mod
from .config import CacheConfig
from .errors import SaescopeError
from .model import LanguageModel, load_model, parse_hook_point
from .shard_writer import DOCUMENTS, MANIFEST, CacheResult, ShardEncoder, fill_shards, finished, shard_path
from .windows import WindowSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_cache(cfg: CacheConfig, out: Path, lm: LanguageModel | None = None, progress: bool = True) -> CacheResult:
    """Run `saescope cache`: fill `out` with the activations of the first cfg.tokens tokens (resumable)."""
    check_config(cfg)
    if cfg.dtype not in DTYPES:
        raise SaescopeError(f"unknown cache dtype {cfg.dtype!r}: choose from {', '.join(DTYPES)}")
    encoder = ShardEncoder(DTYPES[cfg.dtype])
    old, done = finished(cfg, out, encoder)
    if done is not None:
        return done
    corpus = corpus_mod.open_corpus(cfg.corpus)
    lm = lm or load_model(cfg.model, cfg.device, cfg.model_dtype)
    lm.check_layer(parse_hook_point(cfg.hook).layer)
    return fill_shards(cfg, out, old, lm, corpus.doc_ids, lambda start: WindowSource(lm, corpus, cfg, start), encoder, progress)


def check_config(cfg: CacheConfig) -> None:
    """Clear errors for settings no shard folder can be written with."""
    if cfg.windows_per_shard % cfg.batch_size:
        raise SaescopeError(f"--windows-per-shard ({cfg.windows_per_shard}) must be a multiple of --batch-size ({cfg.batch_size})")
    if not 0 <= cfg.skip_positions < cfg.context_size:
        raise SaescopeError("--skip-positions must be smaller than --context-size")
    if cfg.tokens <= 0:
        raise SaescopeError("--tokens must be positive")
    parse_hook_point(cfg.hook)  # a residual hook, or an MLP's input or output (windows.py captures each)


class ActivationCache:
    """Read side of a cache folder: metadata, shuffled training batches, and window provenance."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise SaescopeError(f"{self.path} is not an activation cache (no {MANIFEST}); create one with `saescope cache`")
        self.manifest = json.loads(manifest.read_text())
        self.config = self.manifest["config"]
        self.d_model: int = self.manifest["d_model"]
        self.shards = sorted(self.path.glob("shard_*.safetensors"))
        if not self.shards:
            raise SaescopeError(f"{self.path} holds no shards yet; run `saescope cache` into it")
        self.rows_per_window = self.config["context_size"] - self.config["skip_positions"]
        self.n_windows: int = self.manifest["n_windows"]
        self.n_rows = self.n_windows * self.rows_per_window
        self.batch_limit: int | None = None  # a data-parallel share stops where every rank's share still has a batch

    def share(self, rank: int, world: int) -> ActivationCache:
        """What data-parallel rank `rank` of `world` trains on: every world-th shard from `rank` on, cut to
        the batches the smallest share holds (the ranks step together)."""
        if world > len(self.shards):
            raise SaescopeError(f"{self.path} holds {len(self.shards)} shards, fewer than the {world} data-parallel ranks")
        rows = []
        for path in self.shards:
            with safe_open(str(path), "pt") as f:
                rows.append(int(f.metadata()["n_windows"]) * self.rows_per_window)
        part = copy.copy(self)
        part.shards = self.shards[rank::world]
        part.n_rows = min(sum(rows[r::world]) for r in range(world))
        part.batch_limit = part.n_rows
        return part

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def hook(self) -> str:
        return self.config["hook"]

    @functools.cached_property
    def whole_windows(self) -> int:
        """Windows in the shards from the first on, counted from their headers: a cache still being written
        (or killed) holds its whole shards, whatever its manifest says yet."""
        n, per_shard = 0, self.config["windows_per_shard"]
        for i in itertools.count():
            if not shard_path(self.path, i).exists():
                break
            with safe_open(str(shard_path(self.path, i)), "pt") as f:
                meta = f.metadata()
            if int(meta["first_window"]) != n:
                break
            n += int(meta["n_windows"])
            if int(meta["n_windows"]) != per_shard:  # a short shard is the last
                break
        return n

    @property
    def windows_per_shard(self) -> int:
        return self.config["windows_per_shard"]

    def load_shard(self, i: int, name: str = "activations") -> torch.Tensor:
        """One tensor of the i-th shard this cache (or share of it) trains on."""
        with safe_open(str(self.shards[i]), "pt") as f:
            return f.get_tensor(name)

    def read_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Every tensor of shard i of the folder (windows i * windows_per_shard on): what WindowSource reads."""
        with safe_open(str(shard_path(self.path, i)), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        skip: int = 0,
        buffer_shards: int = 8,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = True,
        device: str | torch.device = "cpu",
    ) -> Iterator[torch.Tensor]:
        """One epoch of shuffled batches on `device`: shards in random order, rows mixed across
        `buffer_shards` shards; the first `skip` are drawn but not yielded (resuming inside an epoch)."""
        batches = self._batches(batch_size, seed, buffer_shards, dtype, drop_last, torch.device(device))
        if self.batch_limit is not None:
            batches = itertools.islice(batches, self.batch_limit // batch_size)
        for i, batch in enumerate(batches):
            if i >= skip:
                yield batch

    def batches_per_pass(self, batch_size: int) -> int:
        return self.n_rows // batch_size

    def _batches(
        self, batch_size: int, seed: int, buffer_shards: int, dtype: torch.dtype, drop_last: bool, device: torch.device
    ) -> Iterator[torch.Tensor]:
        # The shuffle buffer lives on the training device in the storage dtype (half the bytes of fp32 to
        # move, and a GPU shuffles it in place of the CPU); each batch is converted as it is cut, exactly
        # (bf16/fp16 -> fp32). The next shard group is read from disk while this one is trained on.
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist()
        groups = [order[start : start + buffer_shards] for start in range(0, len(order), buffer_shards)]
        carry = None
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(self._load_group, groups[0], device.type == "cuda")
            for g in range(len(groups)):
                loaded = pending.result().to(device, non_blocking=True)
                if g + 1 < len(groups):
                    pending = reader.submit(self._load_group, groups[g + 1], device.type == "cuda")
                buf = loaded if carry is None else torch.cat([carry, loaded])
                buf = buf[torch.randperm(len(buf), generator=gen).to(device)]
                n_full = len(buf) // batch_size
                for b in range(n_full):
                    yield buf[b * batch_size : (b + 1) * batch_size].to(dtype)
                carry = buf[n_full * batch_size :]
        if carry is not None and len(carry) and not drop_last:
            yield carry.to(dtype)

    def _load_group(self, shards: list[int], pin: bool = False) -> torch.Tensor:
        """Rows of these shards; `pin`: in page-locked memory, so the copy to the GPU runs asynchronously."""
        rows = torch.cat([self.load_shard(i) for i in shards])
        return rows.pin_memory() if pin else rows

    def sample(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """About `n` rows drawn uniformly from the whole cache, one shard in memory at a time."""
        gen = torch.Generator().manual_seed(seed)
        frac = min(1.0, n / self.n_rows)
        picks = []
        for i in range(len(self.shards)):
            acts = self.load_shard(i)
            k = max(1, round(len(acts) * frac))
            picks.append(acts[torch.randperm(len(acts), generator=gen)[:k]].to(dtype))
        return torch.cat(picks)


def reusable_cache(path: str | Path, cfg: CacheConfig) -> tuple[ActivationCache | None, str | None]:
    """The activation cache at `path` if it holds the first windows `cfg` asks for (the same model, hook,
    corpus documents and windowing; the storage dtype may differ), else None and why not."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        return None, f"the activation cache {path} is gone"
    try:
        cache = ActivationCache(path)
    except SaescopeError as exc:
        return None, str(exc)
    diff = [k for k in CacheConfig.IDENTITY if k != "dtype" and cache.config.get(k) != getattr(cfg, k)]
    if diff:
        return None, f"{path} now holds activations of another {', '.join(diff)}"
    if json.loads((path / DOCUMENTS).read_text()) != corpus_mod.open_corpus(cfg.corpus).doc_ids:
        return None, f"the documents of corpus {cfg.corpus!r} changed since {path} was written"
    if cache.whole_windows == 0:
        return None, f"{path} holds no whole shards yet"
    return cache, None
