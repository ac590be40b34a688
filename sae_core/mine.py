"""Mine every feature of an SAE into the store: `saescope mine`.

Phase 1 is the one pass over the corpus: token windows -> model cut at the hook -> SAE encode. It
uses the activation cache's resumable sharded writer (`shards.fill_shards`) but stores each
position's sparse code instead of its activation, in `<sae>/mining/`. A killed run keeps its whole
chunks and a re-run continues after them. Where the cache the SAE was trained on still holds the
windows (same model, hook, corpus and windowing), their tokens and activations are read from it
instead of running the model; later windows come from the model. Either way the encoder converts the
rows to the dtype it computes in, so when the cache stores what the model computes (the same dtype, or
fp32) the codes are bitwise the model path's; a narrower cache (bf16 of an fp32 model) gives the
rounded activations the SAE was trained on. A run mined from a cache says so in its run config
(`activations`), and a cache gone or changed falls back to the model with a note.
Phase 2 (`feature_stats.compute`) sweeps those chunks for statistics and examples, then the decoder
gives logit effects and neighbours, and `store.write` publishes the run in one switch. The chunks
are deleted once the run is in the store.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import corpus as corpus_mod
from . import feature_stats
from .cache import CacheConfig, check_config, reusable_cache
from .coactivation import CoactivationCounter
from .config import MineConfig
from .distributed.comms import Grid, single_process
from .distributed.mining_parts import part_chunks
from .distributed.mining_parts import plan as shard_plan
from .errors import SaescopeError
from .interchange import load_sae, sae_bytes
from .model import LanguageModel, load_model, parse_hook
from .shard_writer import ShardEncoder, fill_shards, finished
from .store import db, write
from .windows import WindowSource


@dataclass
class MineResult:
    sae_name: str
    run_id: int
    positions: int  # activation positions mined (sink positions excluded)
    alive: int  # features that fired at least once
    n_latents: int
    seconds: float
    skipped: bool = False  # the store already held this run
    published: bool = True  # False for a part mined with --shard (the merge publishes)
    notes: list[str] = field(default_factory=list)


class CodeEncoder(ShardEncoder):
    """Stores each position's SAE code: (values, latent indices), w per position (k for TopK).

    The encoder is one fused addmm per block of rows, with b_pre folded into the bias
    (W (x - b_pre) + b = W x + (b - W b_pre)); blocks keep the [rows, n_latents] pre-activations
    small enough for top-k to read them from cache."""

    BLOCK = 512

    def __init__(self, sae, width: int, compute_dtype: torch.dtype, identity: dict):
        self.width, self.compute_dtype, self.identity = width, compute_dtype, identity
        with torch.no_grad():
            W = sae.W_enc.detach().float()
            self.W_T = W.T.to(compute_dtype)  # [d, n]
            self.bias = (sae.b_enc.detach().float() - W @ sae.b_pre.detach().float()).to(compute_dtype)
            thresholds = sae.activation_thresholds()  # JumpReLU, BatchTopK: a code fires above its latent's threshold
            self.thresholds = None if thresholds is None else thresholds.detach().float().clamp_min(0)
        self.idx_dtype = torch.int16 if sae.cfg.n_latents <= 32767 else torch.int32

    def bytes_per_row(self, d_model: int) -> int:
        return self.width * (4 + self.idx_dtype.itemsize)

    @torch.inference_mode()
    def __call__(self, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        x = acts.reshape(-1, acts.shape[-1]).to(self.W_T.device, self.compute_dtype)  # cache rows arrive on the CPU
        vals, idx = [], []
        for s in range(0, len(x), self.BLOCK):
            v, i = torch.addmm(self.bias, x[s : s + self.BLOCK], self.W_T).topk(self.width, dim=-1)
            vals.append(v)
            idx.append(i)
        vals_all, idx_all = torch.cat(vals).float(), torch.cat(idx)
        if self.thresholds is not None:
            vals_all = vals_all * (vals_all > self.thresholds.to(vals_all.device)[idx_all])
        return {"vals": vals_all.relu().to("cpu"), "idx": idx_all.to("cpu", self.idx_dtype)}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "sae"


def _weights_digest(sae_dir: Path) -> str:
    h = hashlib.sha256()
    with open(sae_dir / "sae_weights.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _neighbours(W_dec: torch.Tensor, n_top: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    Wn = torch.nn.functional.normalize(W_dec.float(), dim=1)
    k = min(n_top, len(Wn) - 1)
    ids, sims = [], []
    for s in range(0, len(Wn), chunk):
        cos = Wn[s : s + chunk] @ Wn.T
        cos[torch.arange(len(cos)), torch.arange(s, s + len(cos))] = -2.0  # not its own neighbour
        v, i = cos.topk(k, dim=1)
        ids.append(i.numpy())
        sims.append(v.numpy())
    return np.concatenate(ids), np.concatenate(sims)


def mine(
    sae_dir: str | Path, cfg: MineConfig, lm: LanguageModel | None = None, progress: bool = True, grid: Grid | None = None
) -> MineResult:
    """Mine the SAE in `sae_dir` into the store. Sharded (distributed/mining_parts.py): with cfg.shard this
    process mines one part of the windows and stops, with cfg.merge_shards it publishes the parts, and
    under torchrun (`grid`) every rank mines its part and rank 0 publishes them."""
    t0 = time.perf_counter()
    grid = grid or single_process()
    mine_part, merge_count = shard_plan(cfg.shard, cfg.merge_shards, grid)
    sae_dir = Path(sae_dir)
    loaded = load_sae(sae_dir)
    sae, prov = loaded.sae, loaded.provenance
    model_name, hook = prov.require(sae_dir)
    corpus = cfg.corpus or prov.corpus
    if cfg.tokens <= 0:
        raise SaescopeError("--tokens must be positive")
    name = slug(cfg.name or sae_dir.resolve().name)
    context, skip = prov.context_size, prov.skip_positions
    cache = CacheConfig(
        model=model_name,
        hook=hook,
        corpus=corpus,
        context_size=context,
        skip_positions=skip,
        seed=prov.seed,
        dtype="float32",
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        windows_per_shard=cfg.windows_per_chunk,
        device=cfg.device,
        model_dtype=cfg.model_dtype,
    )
    check_config(cache)
    identity = {
        "weights": _weights_digest(sae_dir),
        "stats": asdict(cfg.stats),
        "n_logits": cfg.n_logits,
        "n_neighbours": cfg.n_neighbours,
        "max_active": cfg.max_active if sae.fixed_code_width() is None else None,
        "coactivation": cfg.coactivation,
    }
    from_cache, notes = None, []
    if prov.activations and corpus == prov.corpus:
        from_cache, why = reusable_cache(prov.activations, cache)
        if why:
            notes.append(f"{why}: mining runs the model over every window")
    if from_cache is not None:  # absent for runs of the model, so their identity is what it always was
        identity["activations"] = {
            "source": "cache",
            "dtype": from_cache.config["dtype"],
            "windows": min(from_cache.whole_windows, cache.n_windows),
        }
    run_config = {"cache": asdict(cache), **identity}

    part_only = mine_part is not None and merge_count is None  # only reads the store (parts may start together: one creates it)
    # under torchrun the other ranks connect after rank 0: a new SQLite file's first connections race to switch
    # it to WAL, and the loser fails at once with "database is locked" (its busy timeout does not cover that)
    engine = db.make_engine(cfg.db) if grid.is_main else None
    if engine is not None and not part_only and db.current_revision(engine) is None:  # empty: create the schema; else it must match
        db.upgrade(engine)
    grid.world.barrier()  # under torchrun the other ranks wait for rank 0's schema
    engine = engine or db.make_engine(cfg.db)
    empty = db.current_revision(engine) is None
    if not empty:
        db.check_schema(engine)
    if not cfg.force and not empty:
        existing = write.find_complete_run(engine, name, run_config)
        if existing is not None:
            return MineResult(
                name,
                existing,
                0,
                0,
                sae.cfg.n_latents,
                time.perf_counter() - t0,
                skipped=True,
                notes=[f"the store already holds run {existing} of {name} with these settings; --force re-mines", *notes],
            )

    layer = parse_hook(hook)
    lm = lm or load_model(model_name, cfg.device, cfg.model_dtype)
    lm.check_layer(layer)
    if lm.d_model != sae.cfg.d_in:
        raise SaescopeError(f"the SAE reads width {sae.cfg.d_in} but {model_name} at {hook} has width {lm.d_model}")
    compute_dtype = lm.dtype if lm.device.type == "cpu" else torch.float32
    width = sae.code_width(cfg.max_active)
    encoder = CodeEncoder(sae.to(lm.device), width, compute_dtype, identity)
    work = sae_dir / "mining"
    if mine_part is not None or merge_count is None:  # phase 1 here: all the windows, or this process's part
        folder, first, part_cache = work, 0, cache
        if mine_part is not None:
            first, last = mine_part.windows(cache.n_windows, cfg.windows_per_chunk)
            folder, part_cache = mine_part.folder(work), replace(cache, tokens=(last - first) * context)
            encoder.identity = {**identity, "part": [mine_part.index, mine_part.count, first, last]}
        old, done = finished(part_cache, folder, encoder)
        if done is None:
            corpus_docs = corpus_mod.open_corpus(corpus)
            done = fill_shards(
                part_cache,
                folder,
                old,
                lm,
                corpus_docs.doc_ids,
                lambda start: WindowSource(lm, corpus_docs, part_cache, first + start, from_cache),
                encoder,
                progress,
                desc="mining" if mine_part is None else f"mining part {mine_part}",
            )
        notes += done.notes
    grid.world.barrier()  # under torchrun: every part is mined before rank 0 merges them
    if part_only and mine_part is not None and done is not None:
        if not grid.distributed:
            notes.append(f"part {mine_part} mined ({done.n_rows:,} positions); publish the parts with --merge-shards {mine_part.count}")
        return MineResult(name, 0, done.n_rows, 0, sae.cfg.n_latents, time.perf_counter() - t0, published=False, notes=notes)

    if merge_count is None:
        chunks = feature_stats.CodeChunks(sorted(work.glob("shard_*.safetensors")), skip)
        documents = work / "documents.json"
    else:
        paths, first_windows, documents_folder = part_chunks(work, merge_count, cache.n_windows, cfg.windows_per_chunk)
        chunks = feature_stats.CodeChunks(paths, skip, first_windows)
        documents = documents_folder / "documents.json"
    counter = CoactivationCounter(sae.cfg.n_latents) if cfg.coactivation else None  # fed by the statistics sweep
    tables = feature_stats.compute(chunks, sae.cfg.n_latents, context - skip, context, cfg.stats, progress=progress, coactivation=counter)
    coactivation = counter.top_partners(cfg.coactivation) if counter is not None else None
    W_dec = sae.W_dec.detach().float().cpu()
    logits = write.LogitEffects(*lm.logit_effects(W_dec, cfg.n_logits))
    neighbours = write.Neighbours(*_neighbours(W_dec, cfg.n_neighbours))
    doc_ids = json.loads(documents.read_text())
    eval_path = sae_dir / "eval.json"
    model = write.ModelRecord(lm.name, lm.d_model, lm.n_layers, lm.vocab_size, lambda: write.token_strings(lm.tokenizer, lm.vocab_size))
    sae_record = write.SAERecord(
        name=name,
        hook=hook,
        architecture=sae.architecture,
        d_in=sae.cfg.d_in,
        n_latents=sae.cfg.n_latents,
        k=getattr(sae.cfg, "k", None),
        path=str(sae_dir.resolve()),
        train_config=loaded.training,
        metrics=json.loads(eval_path.read_text()) if eval_path.exists() else {},
    )
    # the weights go with the run, so the live features run exactly the SAE these pages describe (store/weights.py)
    run = write.MinedRun(
        model, sae_record, corpus, run_config, tables, logits, neighbours, doc_ids, weights=sae_bytes(loaded), coactivation=coactivation
    )
    run_id = write.write_run(engine, run, progress=progress)
    shutil.rmtree(work, ignore_errors=True)
    return MineResult(
        name, run_id, tables.positions, int((tables.n_fired > 0).sum()), sae.cfg.n_latents, time.perf_counter() - t0, notes=notes
    )
