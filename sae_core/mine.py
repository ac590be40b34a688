"""Mine every feature of an SAE into the store: `saescope mine`.

Phase 1 is the one pass over the corpus: token windows -> model cut at the hook -> SAE encode. It
uses the activation cache's resumable sharded writer (`shard_writer.fill_shards`) but stores each
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
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.engine import Engine

from . import corpus as corpus_mod
from . import feature_stats
from .cache import ActivationCache, CacheConfig, check_config, reusable_cache
from .coactivation import Coactivation, CoactivationCounter
from .config import MineConfig
from .distributed.comms import Grid, single_process
from .distributed.mining_parts import Part, part_chunks
from .distributed.mining_parts import plan as shard_plan
from .errors import SaescopeError
from .interchange import LoadedSAE, load_sae, sae_bytes
from .model import LanguageModel, load_model, parse_hook_point
from .sae.base import DictionarySAE
from .shard_writer import CacheResult, ShardEncoder, fill_shards, finished
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

    def __init__(self, sae: DictionarySAE, width: int, compute_dtype: torch.dtype, identity: dict) -> None:
        self.width, self.compute_dtype, self.identity = width, compute_dtype, identity
        with torch.no_grad():
            W, bias = (t.detach().float() for t in sae.encoder_affine())  # the input's centring folded into the bias
            self.W_T = W.T.to(compute_dtype)  # [d, n]
            self.bias = bias.to(compute_dtype)
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


class ShardRole(Enum):
    """What one process does with a run's windows (distributed/mining_parts.py cuts them into parts)."""

    WHOLE = "whole"  # mines every window, then publishes the run: a plain `saescope mine`
    PART = "part"  # mines one part and stops: `--shard I/N`, or a torchrun rank other than 0
    MERGE = "merge"  # publishes the parts mined before as one run: `--merge-shards N`
    PART_AND_MERGE = "part and merge"  # torchrun rank 0: mines its part, waits for the other ranks', publishes all


@dataclass(frozen=True)
class ShardPlan:
    """This process's role in a (possibly sharded) mining run, with the part it mines and the parts it merges."""

    role: ShardRole
    part: Part | None = None  # the part mined: PART and PART_AND_MERGE
    parts: int = 0  # how many parts are merged: MERGE and PART_AND_MERGE

    @classmethod
    def of(cls, cfg: MineConfig, grid: Grid) -> ShardPlan:
        """From --shard / --merge-shards, or from the torchrun grid (rank r of W mines part r/W, rank 0 merges)."""
        part, merge = shard_plan(cfg.shard, cfg.merge_shards, grid)
        if merge is None:
            return cls(ShardRole.WHOLE) if part is None else cls(ShardRole.PART, part)
        return cls(ShardRole.MERGE, parts=merge) if part is None else cls(ShardRole.PART_AND_MERGE, part, merge)

    @property
    def mines(self) -> bool:
        """Phase 1 (the pass over the corpus) runs in this process."""
        return self.role is not ShardRole.MERGE

    @property
    def publishes(self) -> bool:
        """Phase 2 (statistics and the store write) runs in this process."""
        return self.role is not ShardRole.PART


@dataclass
class MiningJob:
    """One mining run as the SAE's folder and the config define it, before the store or the model is touched."""

    sae_dir: Path
    loaded: LoadedSAE
    name: str  # the SAE's name in the store (a URL slug)
    model_name: str
    hook: str
    corpus: str
    cache: CacheConfig  # the windows mined, as an activation cache would describe them
    identity: dict  # what, besides the windows, makes two runs the same (the chunks and the run config record it)
    from_cache: ActivationCache | None  # the training cache the first windows' activations are read from
    notes: list[str] = field(default_factory=list)

    @property
    def sae(self) -> DictionarySAE:
        return self.loaded.sae

    @property
    def n_latents(self) -> int:
        return self.loaded.sae.cfg.n_latents

    @property
    def work(self) -> Path:
        """Where phase 1 writes its chunks (deleted once the run is in the store)."""
        return self.sae_dir / "mining"

    @property
    def run_config(self) -> dict:
        return {"cache": asdict(self.cache), **self.identity}


def mine(
    sae_dir: str | Path, cfg: MineConfig, lm: LanguageModel | None = None, progress: bool = True, grid: Grid | None = None
) -> MineResult:
    """Mine the SAE in `sae_dir` into the store. Sharded (distributed/mining_parts.py): with cfg.shard this
    process mines one part of the windows and stops, with cfg.merge_shards it publishes the parts, and
    under torchrun (`grid`) every rank mines its part and rank 0 publishes them (`ShardPlan`)."""
    t0 = time.perf_counter()
    grid = grid or single_process()
    plan = ShardPlan.of(cfg, grid)
    job = resolve(Path(sae_dir), cfg)
    engine, existing = open_store(cfg, grid, plan, job)
    if existing is not None:
        notes = [f"the store already holds run {existing} of {job.name} with these settings; --force re-mines", *job.notes]
        return MineResult(job.name, existing, 0, 0, job.n_latents, time.perf_counter() - t0, skipped=True, notes=notes)
    lm = prepare_model(job, cfg, lm)
    done = mine_codes(job, plan, cfg, lm, progress) if plan.mines else None
    if done is not None:
        job.notes += done.notes
    grid.world.barrier()  # under torchrun: every part is mined before rank 0 merges them
    if not plan.publishes:
        return part_mined(job, plan, done, grid, t0)
    chunks, documents = code_chunks(job, plan, cfg)
    tables, coactivation = statistics(job, cfg, chunks, progress)
    run_id = publish(engine, job, cfg, lm, tables, coactivation, documents, progress)
    shutil.rmtree(job.work, ignore_errors=True)
    alive = int((tables.n_fired > 0).sum())
    return MineResult(job.name, run_id, tables.positions, alive, job.n_latents, time.perf_counter() - t0, notes=job.notes)


def part_mined(job: MiningJob, plan: ShardPlan, done: CacheResult | None, grid: Grid, t0: float) -> MineResult:
    """What a process that mined a part and publishes nothing reports (the merge, or torchrun's rank 0, publishes)."""
    assert plan.part is not None and done is not None  # ShardRole.PART always mines a part
    if not grid.distributed:
        job.notes.append(f"part {plan.part} mined ({done.n_rows:,} positions); publish the parts with --merge-shards {plan.part.count}")
    return MineResult(job.name, 0, done.n_rows, 0, job.n_latents, time.perf_counter() - t0, published=False, notes=job.notes)


def resolve(sae_dir: Path, cfg: MineConfig) -> MiningJob:
    """Load the SAE, check the config, and fix what the run is: its windows, its identity, where activations come from."""
    loaded = load_sae(sae_dir)
    sae, prov = loaded.sae, loaded.provenance
    model_name, hook = prov.require(sae_dir)
    corpus = cfg.corpus or prov.corpus
    if cfg.tokens <= 0:
        raise SaescopeError("--tokens must be positive")
    name = slug(cfg.name or sae_dir.resolve().name)
    cache = CacheConfig(
        model=model_name,
        hook=hook,
        corpus=corpus,
        context_size=prov.context_size,
        skip_positions=prov.skip_positions,
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
    return MiningJob(sae_dir, loaded, name, model_name, hook, corpus, cache, identity, from_cache, notes)


def open_store(cfg: MineConfig, grid: Grid, plan: ShardPlan, job: MiningJob) -> tuple[Engine, int | None]:
    """Connect to the store, creating its schema where it is empty (not for a part: it only reads the store, and
    parts may start together), and find a complete run with this identity (None: mine; always None with --force)."""
    # under torchrun the other ranks connect after rank 0: a new SQLite file's first connections race to switch
    # it to WAL, and the loser fails at once with "database is locked" (its busy timeout does not cover that)
    engine = db.make_engine(cfg.db) if grid.is_main else None
    if engine is not None and plan.role is not ShardRole.PART and db.current_revision(engine) is None:
        db.upgrade(engine)  # empty: create the schema; else it must match
    grid.world.barrier()  # under torchrun the other ranks wait for rank 0's schema
    engine = engine or db.make_engine(cfg.db)
    if db.current_revision(engine) is None:
        return engine, None
    db.check_schema(engine)
    return engine, None if cfg.force else write.find_complete_run(engine, job.name, job.run_config)


def prepare_model(job: MiningJob, cfg: MineConfig, lm: LanguageModel | None) -> LanguageModel:
    """The model the SAE reads (loaded unless given), checked against the SAE's hook and width."""
    layer = parse_hook_point(job.hook).layer  # a residual SAE's hook, or a transcoder's MLP input
    lm = lm or load_model(job.model_name, cfg.device, cfg.model_dtype)
    lm.check_layer(layer)
    if lm.d_model != job.sae.cfg.d_in:
        raise SaescopeError(f"the SAE reads width {job.sae.cfg.d_in} but {job.model_name} at {job.hook} has width {lm.d_model}")
    return lm


def mine_codes(job: MiningJob, plan: ShardPlan, cfg: MineConfig, lm: LanguageModel, progress: bool) -> CacheResult:
    """Phase 1: every window of the run (or of this process's part) -> model (or cache) -> SAE code, into
    resumable chunk files; chunks already written by a killed run with the same identity are kept."""
    folder, first, windows, identity = job.work, 0, job.cache, job.identity
    if plan.part is not None:
        first, last = plan.part.windows(job.cache.n_windows, cfg.windows_per_chunk)
        folder, windows = plan.part.folder(job.work), replace(job.cache, tokens=(last - first) * job.cache.context_size)
        identity = {**job.identity, "part": [plan.part.index, plan.part.count, first, last]}
    compute_dtype = lm.dtype if lm.device.type == "cpu" else torch.float32
    encoder = CodeEncoder(job.sae.to(lm.device), job.sae.code_width(cfg.max_active), compute_dtype, identity)
    old, done = finished(windows, folder, encoder)
    if done is not None:
        return done
    corpus_docs = corpus_mod.open_corpus(job.corpus)
    return fill_shards(
        windows,
        folder,
        old,
        lm,
        corpus_docs.doc_ids,
        lambda start: WindowSource(lm, corpus_docs, windows, first + start, job.from_cache),
        encoder,
        progress,
        desc="mining" if plan.part is None else f"mining part {plan.part}",
    )


def code_chunks(job: MiningJob, plan: ShardPlan, cfg: MineConfig) -> tuple[feature_stats.CodeChunks, Path]:
    """The chunk files phase 2 sweeps, in window order (one folder, or every part's), and the run's document list."""
    skip = job.cache.skip_positions
    if plan.role is ShardRole.WHOLE:
        return feature_stats.CodeChunks(sorted(job.work.glob("shard_*.safetensors")), skip), job.work / "documents.json"
    paths, first_windows, documents_folder = part_chunks(job.work, plan.parts, job.cache.n_windows, cfg.windows_per_chunk)
    return feature_stats.CodeChunks(paths, skip, first_windows), documents_folder / "documents.json"


def statistics(
    job: MiningJob, cfg: MineConfig, chunks: feature_stats.CodeChunks, progress: bool
) -> tuple[feature_stats.FeatureTables, Coactivation | None]:
    """Phase 2's sweep: per-feature statistics and examples, and the co-activation partners counted on the way."""
    counter = CoactivationCounter(job.n_latents) if cfg.coactivation else None  # fed by the statistics sweep
    context = job.cache.context_size
    rows_per_window = context - job.cache.skip_positions
    tables = feature_stats.compute(chunks, job.n_latents, rows_per_window, context, cfg.stats, progress=progress, coactivation=counter)
    return tables, counter.top_partners(cfg.coactivation) if counter is not None else None


def publish(
    engine: Engine,
    job: MiningJob,
    cfg: MineConfig,
    lm: LanguageModel,
    tables: feature_stats.FeatureTables,
    coactivation: Coactivation | None,
    documents: Path,
    progress: bool,
) -> int:
    """Add what the decoder says (logit effects, neighbours) and write the run to the store in one switch."""
    sae = job.sae
    W_dec = sae.W_dec.detach().float().cpu()
    logits = write.LogitEffects(*lm.logit_effects(W_dec, cfg.n_logits))
    neighbours = write.Neighbours(*_neighbours(W_dec, cfg.n_neighbours))
    doc_ids = json.loads(documents.read_text())
    eval_path = job.sae_dir / "eval.json"
    model = write.ModelRecord(lm.name, lm.d_model, lm.n_layers, lm.vocab_size, lambda: write.token_strings(lm.tokenizer, lm.vocab_size))
    sae_record = write.SAERecord(
        name=job.name,
        hook=job.hook,
        architecture=sae.architecture,
        d_in=sae.cfg.d_in,
        n_latents=sae.cfg.n_latents,
        k=getattr(sae.cfg, "k", None),
        path=str(job.sae_dir.resolve()),
        train_config=job.loaded.training,
        metrics=json.loads(eval_path.read_text()) if eval_path.exists() else {},
    )
    # the weights go with the run, so the live features run exactly the SAE these pages describe (store/weights.py)
    run = write.MinedRun(
        model,
        sae_record,
        job.corpus,
        job.run_config,
        tables,
        logits,
        neighbours,
        doc_ids,
        weights=sae_bytes(job.loaded),
        coactivation=coactivation,
    )
    return write.write_run(engine, run, progress=progress)
