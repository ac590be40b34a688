"""The activation cache: residual-stream activations of packed token windows, sharded on disk.

Layout of a cache folder:
    cache.json                 what the cache is of (model, hook, corpus, ...) and how far it got
    documents.json             document ids; `doc_index` values index this list
    shard_00000.safetensors    activations [rows, d_model] plus tokens / doc_index / doc_offset
                               [windows, context_size]; rows = windows * (context_size - skip)

Each shard holds `windows_per_shard` windows (the last may hold fewer) and appears atomically
(written to a temporary name, fsynced, renamed), so a killed run leaves only whole shards. A
re-run of the same command counts the whole shards and continues after them; windows come in a
fixed order, so the result equals an uninterrupted run. Positions before `skip_positions` in each
window (the attention sink at position 0) are not stored. `saescope mine` reuses this writer to store
SAE codes, and reads the windows an existing cache holds from it instead of the model (WindowSource).
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import corpus as corpus_mod
from .errors import SaescopeError
from .model import DEFAULT_MODEL, LanguageModel, load_model, parse_hook

MANIFEST = "cache.json"
DOCUMENTS = "documents.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheConfig:
    """Everything `saescope cache` takes. The fields marked identity must match to resume."""

    model: str = DEFAULT_MODEL          # identity: model name (see model.load_model)
    hook: str = "blocks.8.hook_resid_post"  # identity: hook point
    corpus: str = "demo"                # identity: corpus spec (see corpus.open_corpus)
    context_size: int = 128             # identity: tokens per window
    skip_positions: int = 1             # identity: leading positions not stored (attention sink)
    seed: int = 0                       # identity: document order
    dtype: str = "bfloat16"             # identity: storage dtype of activations
    tokens: int = 1_000_000             # tokens to process (windows = ceil(tokens / context_size)); may grow on re-run
    batch_size: int = 32                # windows per forward pass
    windows_per_shard: int = 256        # must be a multiple of batch_size
    device: str = "auto"
    model_dtype: str = "auto"           # dtype the LM computes in

    IDENTITY = ("model", "hook", "corpus", "context_size", "skip_positions", "seed", "dtype")

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY}

    @property
    def n_windows(self) -> int:
        return -(-self.tokens // self.context_size)


@dataclass
class CacheResult:
    out: Path
    n_windows: int
    n_rows: int
    d_model: int
    complete: bool
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard_{i:05d}.safetensors"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _existing_windows(out: Path, windows_per_shard: int) -> tuple[int, int]:
    """(whole full shards on disk, windows in them). A trailing short shard is dropped: it is redone."""
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    n = 0
    while _shard_path(out, n).exists():
        with safe_open(str(_shard_path(out, n)), "pt") as f:
            if int(f.metadata()["n_windows"]) != windows_per_shard:
                break
        n += 1
    for stale in sorted(out.glob("shard_*.safetensors"))[n:]:
        stale.unlink()
    return n, n * windows_per_shard


def _check_config(out: Path, cfg: CacheConfig, encoder_identity: dict) -> dict | None:
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

    identity: dict = {}          # recorded in the manifest; a resume with another identity is refused

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def bytes_per_row(self, d_model: int) -> int:
        return d_model * torch.empty(0, dtype=self.dtype).element_size()

    def __call__(self, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        """acts [windows, positions, d_model] -> tensors with one row per position, concatenated per shard."""
        return {"activations": acts.reshape(-1, acts.shape[-1]).to("cpu", self.dtype)}


@dataclass
class WindowBatch:
    """Consecutive windows with their residuals at the hook (positions before skip_positions dropped)."""

    tokens: np.ndarray          # [windows, context_size] int32, as are doc_index and doc_offset
    doc_index: np.ndarray
    doc_offset: np.ndarray
    acts: torch.Tensor          # [windows, context_size - skip_positions, d_model]

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def cat(parts: list[WindowBatch]) -> WindowBatch:
        if len(parts) == 1:
            return parts[0]
        dtype = functools.reduce(torch.promote_types, (p.acts.dtype for p in parts))   # a lossless common dtype
        return WindowBatch(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("tokens", "doc_index", "doc_offset")),
                           torch.cat([p.acts.to(parts[-1].acts.device, dtype) for p in parts]))


class WindowSource:
    """The windows `build_cache` stores, in the corpus's fixed order from window `start` on, with their
    residuals: read from the shards of `from_cache` (a cache of the same windows: see `reusable_cache`) while
    it holds them, computed by the model after that. Batches are cut exactly as asked whatever their
    source, so the rows an encoder sees together do not depend on where they came from."""

    def __init__(self, lm: LanguageModel, corpus: corpus_mod.Corpus, cfg: CacheConfig, start: int,
                 from_cache: ActivationCache | None = None):
        self.lm, self.corpus, self.cfg, self.layer, self.pos = lm, corpus, cfg, parse_hook(cfg.hook), start
        self.cached = from_cache
        self.n_cached = from_cache.whole_windows if from_cache is not None else 0
        self.windows: Iterator[corpus_mod.Windows] | None = None   # opened at the first window past the cache
        self.shard: tuple[int, dict[str, torch.Tensor]] = (-1, {})

    def take(self, n: int) -> WindowBatch | None:
        """The next `n` windows; fewer where the corpus ends, None after its end."""
        parts = []
        while n > 0 and self.pos < self.n_cached:
            parts.append(self._read(n))
            n -= len(parts[-1])
        if n > 0 and (part := self._run(n)) is not None:
            parts.append(part)
        return WindowBatch.cat(parts) if parts else None

    def _read(self, n: int) -> WindowBatch:
        per_shard = self.cached.config["windows_per_shard"]
        i, local = divmod(self.pos, per_shard)
        if self.shard[0] != i:
            with safe_open(str(_shard_path(self.cached.path, i)), "pt") as f:
                self.shard = (i, {name: f.get_tensor(name) for name in f.keys()})
        t = self.shard[1]
        m = min(n, len(t["tokens"]) - local, self.n_cached - self.pos)
        rows = self.cached.rows_per_window
        acts = t["activations"][local * rows:(local + m) * rows].view(m, rows, -1)
        self.pos += m
        return WindowBatch(*(t[k][local:local + m].numpy() for k in ("tokens", "doc_index", "doc_offset")), acts)

    def _run(self, n: int) -> WindowBatch | None:
        cfg = self.cfg
        if self.windows is None:
            self.shard = (-1, {})
            self.windows = corpus_mod.iter_windows(self.corpus, self.lm.tokenizer, cfg.context_size, cfg.seed, skip_windows=self.pos)
        batch = list(itertools.islice(self.windows, n))
        if not batch:
            return None
        tokens = np.concatenate([w.tokens for w in batch])
        acts = self.lm.residuals(torch.from_numpy(tokens).long(), self.layer)[:, cfg.skip_positions:]
        self.pos += len(batch)
        return WindowBatch(tokens, np.concatenate([w.doc_index for w in batch]), np.concatenate([w.doc_offset for w in batch]), acts)


def build_cache(cfg: CacheConfig, out: Path, lm: LanguageModel | None = None, progress: bool = True,
                encoder: ShardEncoder | None = None, desc: str = "caching", from_cache: ActivationCache | None = None) -> CacheResult:
    """Run `saescope cache`: fill `out` with the activations of the first cfg.tokens tokens.

    With `encoder`, shards hold what it returns instead of the activations (used by `saescope mine`);
    with `from_cache`, the windows it holds are read from it instead of running the model (see WindowSource)."""
    if cfg.windows_per_shard % cfg.batch_size:
        raise SaescopeError(f"--windows-per-shard ({cfg.windows_per_shard}) must be a multiple of --batch-size ({cfg.batch_size})")
    if cfg.dtype not in DTYPES:
        raise SaescopeError(f"unknown cache dtype {cfg.dtype!r}: choose from {', '.join(DTYPES)}")
    if not 0 <= cfg.skip_positions < cfg.context_size:
        raise SaescopeError("--skip-positions must be smaller than --context-size")
    if cfg.tokens <= 0:
        raise SaescopeError("--tokens must be positive")
    layer = parse_hook(cfg.hook)
    out = Path(out)
    encoder = encoder or ShardEncoder(DTYPES[cfg.dtype])
    old = _check_config(out, cfg, encoder.identity)
    if old and old["complete"] and (old["n_windows"] >= cfg.n_windows or old.get("corpus_exhausted")):
        rows = old["n_windows"] * (cfg.context_size - cfg.skip_positions)
        return CacheResult(out, old["n_windows"], rows, old["d_model"], True, resumed_from=old["n_windows"],
                           notes=[f"{out} already holds this cache ({old['n_windows']} windows); nothing to do"])
    corpus = corpus_mod.open_corpus(cfg.corpus)
    lm = lm or load_model(cfg.model, cfg.device, cfg.model_dtype)
    lm.check_layer(layer)
    out.mkdir(parents=True, exist_ok=True)

    n_shards, done = _existing_windows(out, cfg.windows_per_shard)
    target = cfg.n_windows
    result = CacheResult(out, done, 0, lm.d_model, False, resumed_from=done)
    rows_per_window = cfg.context_size - cfg.skip_positions
    need = max(target - done, 0) * rows_per_window * encoder.bytes_per_row(lm.d_model)
    free = shutil.disk_usage(out).free
    if need > free:
        raise SaescopeError(f"not enough disk space in {out}: the cache needs {need / 2**30:.2f} GiB more, {free / 2**30:.2f} GiB free")

    _write_json(out / DOCUMENTS, corpus.doc_ids)
    manifest = {"config": asdict(cfg), "d_model": lm.d_model, "n_windows": done, "complete": False,
                "model_dtype": str(lm.dtype).removeprefix("torch."), "tokenizer_eos": lm.eos_token_id,
                "encoder": encoder.identity}
    if old is None or old["n_windows"] != done:
        _write_json(out / MANIFEST, manifest)

    source = WindowSource(lm, corpus, cfg, done, from_cache)
    bar = tqdm(total=target * cfg.context_size, initial=done * cfg.context_size, unit="tok", unit_scale=True,
               desc=desc, disable=not progress, dynamic_ncols=True)
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
            tensors |= {"tokens": torch.from_numpy(np.concatenate(shard_tok)),
                       "doc_index": torch.from_numpy(np.concatenate(shard_doc)),
                       "doc_offset": torch.from_numpy(np.concatenate(shard_off))}
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_shard, _shard_path(out, n_shards), tensors,
                                    {"n_windows": str(n_win), "first_window": str(done)})
            n_shards += 1
            done += n_win
        if pending is not None:
            pending.result()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SaescopeError(f"disk full while writing {out}; the whole shards written so far are kept: free space and re-run the same command") from exc
        raise
    finally:
        writer.shutdown(wait=True)
        bar.close()

    if exhausted:
        result.notes.append(f"the corpus ended after {done} windows ({done * cfg.context_size} tokens); asked for {cfg.tokens} tokens")
    manifest.update(n_windows=done, complete=True, corpus_exhausted=exhausted)
    _write_json(out / MANIFEST, manifest)
    result.n_windows, result.n_rows, result.complete = done, done * rows_per_window, True
    return result


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
        self.n_rows = self.manifest["n_windows"] * self.rows_per_window

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
            if not _shard_path(self.path, i).exists():
                break
            with safe_open(str(_shard_path(self.path, i)), "pt") as f:
                meta = f.metadata()
            if int(meta["first_window"]) != n:
                break
            n += int(meta["n_windows"])
            if int(meta["n_windows"]) != per_shard:   # a short shard is the last
                break
        return n

    def load_shard(self, i: int, name: str = "activations") -> torch.Tensor:
        with safe_open(str(self.shards[i]), "pt") as f:
            return f.get_tensor(name)

    def batches(self, batch_size: int, seed: int = 0, skip: int = 0, buffer_shards: int = 8, dtype=torch.float32,
                drop_last: bool = True, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
        """One epoch of shuffled batches on `device`: shards in random order, rows mixed across
        `buffer_shards` shards; the first `skip` are drawn but not yielded (resuming inside an epoch)."""
        for i, batch in enumerate(self._batches(batch_size, seed, buffer_shards, dtype, drop_last, torch.device(device))):
            if i >= skip:
                yield batch

    def batches_per_pass(self, batch_size: int) -> int:
        return self.n_rows // batch_size

    def _batches(self, batch_size: int, seed: int, buffer_shards: int, dtype, drop_last: bool, device: torch.device) -> Iterator[torch.Tensor]:
        # The shuffle buffer lives on the training device in the storage dtype (half the bytes of fp32 to
        # move, and a GPU shuffles it in place of the CPU); each batch is converted as it is cut, exactly
        # (bf16/fp16 -> fp32). The next shard group is read from disk while this one is trained on.
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist()
        groups = [order[start:start + buffer_shards] for start in range(0, len(order), buffer_shards)]
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
                    yield buf[b * batch_size:(b + 1) * batch_size].to(dtype)
                carry = buf[n_full * batch_size:]
        if carry is not None and len(carry) and not drop_last:
            yield carry.to(dtype)

    def _load_group(self, shards: list[int], pin: bool = False) -> torch.Tensor:
        """Rows of these shards; `pin`: in page-locked memory, so the copy to the GPU runs asynchronously."""
        rows = torch.cat([self.load_shard(i) for i in shards])
        return rows.pin_memory() if pin else rows

    def sample(self, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
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
