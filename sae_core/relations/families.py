"""Feature families across SAE widths, and the same feature across SAEs of one width: `saescope family`.

Feature splitting (Bricken et al. 2023; Templeton et al. 2024, "Scaling Monosemanticity"): SAEs of
several widths trained on the same activations learn nested dictionaries: a feature of the narrower one
is often close to a normalised sum of a few features of the wider one, and fires where they fire.
We match in two steps:

1. decoder cosine: each feature of the wider SAE takes the narrower SAE's feature whose decoder row is
   nearest (blocks of a [wide, narrow] cosine product, never the whole matrix);
2. co-activation: both SAEs encode one shared sample of activations (the training cache the SAEs name,
   else the model over the corpus's first windows, the tokens mining starts from); a pair is kept when
   the parent fires on at least `min_coactivation` of the positions where the child fires.

SAEs of equal width (other seeds, other runs) are matched the same way in both directions ("match"):
the share of features with a match is the universality check, and each feature's matches give its
stability badge on the pages. Relations are stored per mining run (`feature_relations`), so a re-mined
SAE drops them with its old run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import scipy.sparse as sp
import torch
from sqlalchemy import and_, delete
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

from ..config import FamilyConfig
from ..errors import SaescopeError
from ..interchange import LoadedSAE

if TYPE_CHECKING:
    from ..sae.base import DictionarySAE

SPLIT, MATCH = "split", "match"
RELATION_COLUMNS = ("kind", "source_run_id", "source_feature", "target_run_id", "target_feature", "cosine", "coactivation", "co_fired")


@dataclass
class Relations:
    """Pairs (source feature, target feature) of two SAEs with their scores, arrays of one length."""

    source: np.ndarray  # int64: the parent (split) or the feature matched (match)
    target: np.ndarray  # int64: the child (split) or its match in the other SAE
    cosine: np.ndarray  # float32 decoder cosine
    coactivation: np.ndarray  # float32 P(source fires | target fires) on the sample
    co_fired: np.ndarray  # int64 sample positions where both fire

    def __len__(self) -> int:
        return len(self.source)


def nearest_rows(
    W_from: torch.Tensor, W_to: torch.Tensor, block: int = 2048, on_block: Callable[[], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of W_from, the index of the row of W_to with the largest cosine, and that cosine."""
    a = torch.nn.functional.normalize(W_from.float(), dim=1)
    b_t = torch.nn.functional.normalize(W_to.float(), dim=1).T.contiguous()
    ids, cos = torch.empty(len(a), dtype=torch.long), torch.empty(len(a))
    with torch.no_grad():
        for s in range(0, len(a), block):
            best = (a[s : s + block] @ b_t).max(dim=1)
            cos[s : s + block], ids[s : s + block] = best.values, best.indices
            if on_block:
                on_block()
    return ids.numpy(), cos.numpy()


def active_matrix(sae: DictionarySAE, x: torch.Tensor, block: int = 1024, dtype: torch.dtype = torch.float32) -> sp.csr_matrix:
    """[positions, n_latents] 0/1 matrix of the latents that fire on each row of `x` (raw activations).
    Fixed-width (TopK) codes come from the miner's encoder (one fused addmm and top-k per 512-row block) in
    `dtype`, the miner's compute dtype (bf16 on bf16 hardware: ~3x the fp32 product's speed here)."""
    from ..mine import CodeEncoder

    rows, cols = [], []
    with torch.no_grad():
        if (width := sae.fixed_code_width()) is not None:  # TopK: the miner's fused encoder
            code = CodeEncoder(sae, width, dtype, {})(x.float())
            r, c = torch.nonzero(code["vals"] > 0, as_tuple=True)
            rows.append(r.numpy())
            cols.append(code["idx"][r, c].long().numpy())
        else:
            for s in range(0, len(x), block):
                r, c = torch.nonzero(sae.encode(x[s : s + block].float()) > 0, as_tuple=True)
                rows.append((r + s).numpy())
                cols.append(c.numpy())
    r_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c_all = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(r_all), np.int32), (r_all, c_all)), shape=(len(x), sae.cfg.n_latents))


def _confirmed(
    source: np.ndarray,
    target: np.ndarray,
    cosine: np.ndarray,
    active_source: sp.csr_matrix,
    active_target: sp.csr_matrix,
    min_coactivation: float,
) -> Relations:
    """The candidate pairs whose source fires on at least `min_coactivation` of the target's positions."""
    both = (active_source.T.tocsr() @ active_target).tocsr()  # [n_source, n_target] co-firing counts
    co = np.asarray(both[source, target]).ravel().astype(np.int64) if len(source) else np.zeros(0, np.int64)
    fired = np.asarray(active_target.sum(axis=0)).ravel()[target]
    share = np.where(fired > 0, co / np.maximum(fired, 1), 0.0)
    keep = (fired > 0) & (share >= min_coactivation)
    return Relations(source[keep], target[keep], cosine[keep].astype(np.float32), share[keep].astype(np.float32), co[keep])


def split_relations(
    W_narrow: torch.Tensor,
    W_wide: torch.Tensor,
    active_narrow: sp.csr_matrix,
    active_wide: sp.csr_matrix,
    min_cosine: float,
    min_coactivation: float,
    on_block: Callable[[], None] | None = None,
) -> Relations:
    """Parent (narrow) -> child (wide) pairs: each wide feature under its nearest narrow feature by decoder
    cosine, kept at `min_cosine` or more and confirmed by co-activation on the shared sample."""
    parent, cos = nearest_rows(W_wide, W_narrow, on_block=on_block)
    child = np.arange(len(parent))
    near = cos >= min_cosine
    return _confirmed(parent[near], child[near], cos[near], active_narrow, active_wide, min_coactivation)


def match_relations(
    W_a: torch.Tensor,
    W_b: torch.Tensor,
    active_a: sp.csr_matrix,
    active_b: sp.csr_matrix,
    min_cosine: float,
    min_coactivation: float,
    on_block: Callable[[], None] | None = None,
) -> Relations:
    """Each feature of A -> its nearest feature of B (equal widths), at `min_cosine` or more and confirmed
    by co-activation: A's feature fires where B's does."""
    ids, cos = nearest_rows(W_a, W_b, on_block=on_block)
    mine_ = np.arange(len(ids))
    near = cos >= min_cosine
    return _confirmed(mine_[near], ids[near], cos[near], active_a, active_b, min_coactivation)


@dataclass
class Universality:
    """How many features of SAE `a` have the same feature in SAE `b` (equal widths)."""

    a: str
    b: str
    matched: int
    fired: int  # features of `a` that fired on the sample
    mean_cosine: float  # over the matched features


@dataclass
class FamilyResult:
    saes: list[str]  # narrowest first
    splits: int  # parent -> child relations stored
    matches: int  # same-feature relations stored (both directions)
    sample_positions: int
    sample_source: str  # the cache folder, or "the model"
    universality: list[Universality] = field(default_factory=list)
    seconds: float = 0.0
    example: tuple[str, int] | None = None  # the narrowest SAE's feature with the most children: a family worth opening


@dataclass
class _Member:
    name: str
    sae_id: int
    run_id: int
    model: str
    hook: str
    loaded: LoadedSAE


def _load(engine: Engine, names: list[str]) -> list[_Member]:
    from ..store.schema import SAE
    from ..store.weights import load_run_sae

    if len(set(names)) < 2:
        raise SaescopeError("name at least two different mined SAEs: saescope family --saes A B [C ...]")
    members = []
    with engine.connect() as conn:
        for name in names:
            run, loaded = load_run_sae(conn, name)
            sae_id = conn.execute(SAE.__table__.select().with_only_columns(SAE.id).where(SAE.name == name)).scalar_one()
            members.append(_Member(name, sae_id, run.run_id, run.model, run.hook, loaded))
    first = members[0]
    for m in members[1:]:
        if (m.model, m.hook) != (first.model, first.hook):
            raise SaescopeError(
                f"{m.name} reads {m.model} at {m.hook} but {first.name} reads {first.model} at {first.hook}: "
                "families need one model and hook"
            )
    return sorted(members, key=lambda m: (m.loaded.sae.cfg.n_latents, m.name))


def _sample(members: list[_Member], cfg: FamilyConfig) -> tuple[torch.Tensor, str]:
    """`cfg.sample_tokens` activation rows every SAE encodes: from a training cache the SAEs name (same
    model and hook), else from the model over the corpus's first windows."""
    from ..cache import ActivationCache

    for m in members:
        folder = m.loaded.provenance.activations
        if folder is None:
            continue
        try:
            cache = ActivationCache(folder)
        except SaescopeError:
            continue
        if cache.config.get("model") == m.model and cache.hook == m.hook:
            return cache.sample(cfg.sample_tokens, seed=cfg.seed), str(folder)
    return _model_sample(members[0], cfg), "the model"


def _model_sample(member: _Member, cfg: FamilyConfig) -> torch.Tensor:
    from .. import corpus as corpus_mod
    from ..cache import CacheConfig
    from ..model import load_model
    from ..windows import WindowSource

    prov = member.loaded.provenance
    lm = load_model(member.model, cfg.device, cfg.model_dtype)
    rows = prov.context_size - prov.skip_positions
    windows = -(-cfg.sample_tokens // rows)
    cache_cfg = CacheConfig(model=member.model, hook=member.hook, corpus=prov.corpus, context_size=prov.context_size,
                            skip_positions=prov.skip_positions, seed=prov.seed, tokens=windows * prov.context_size)  # fmt: skip
    source = WindowSource(lm, corpus_mod.open_corpus(prov.corpus), cache_cfg, 0)
    parts = []
    while windows > 0 and (batch := source.take(min(windows, 16))) is not None:
        parts.append(batch.acts.reshape(-1, batch.acts.shape[-1]).float().cpu())
        windows -= len(batch)
    if not parts:
        raise SaescopeError(f"corpus {prov.corpus!r} gave no windows to sample activations from")
    return torch.cat(parts)


def build_families(names: list[str], cfg: FamilyConfig, progress: bool = True) -> FamilyResult:
    """Match the named mined SAEs (one model and hook) and store their relations: split relations between
    each width and the next wider one, match relations between SAEs of one width."""
    from ..model import resolve_dtype
    from ..store import db
    from ..store.bulk import load_rows
    from ..store.changes import mark_changed
    from ..store.schema import FeatureRelation

    t0 = time.perf_counter()
    if cfg.sample_tokens <= 0:
        raise SaescopeError("--sample-tokens must be positive")
    engine = db.open_store(cfg.db)
    members = _load(engine, names)
    x, source = _sample(members, cfg)
    widths = sorted({m.loaded.sae.cfg.n_latents for m in members})
    pairs = [
        (a, b, MATCH) for i, a in enumerate(members) for b in members[i + 1 :] if a.loaded.sae.cfg.n_latents == b.loaded.sae.cfg.n_latents
    ]
    for narrow_w, wide_w in zip(widths, widths[1:]):
        pairs += [
            (a, b, SPLIT)
            for a in members
            if a.loaded.sae.cfg.n_latents == narrow_w
            for b in members
            if b.loaded.sae.cfg.n_latents == wide_w
        ]
    blocks = sum(-(-b.loaded.sae.cfg.n_latents // 2048) * (2 if kind == MATCH else 1) for _, b, kind in pairs)
    bar = tqdm(total=len(members) + blocks, desc="families", unit="step", disable=not progress, dynamic_ncols=True)
    active = {}
    dtype = resolve_dtype(cfg.model_dtype, torch.device("cpu"))  # what mining on the CPU encodes in: the codes it stored
    for m in members:
        active[m.name] = active_matrix(m.loaded.sae, x, dtype=dtype)
        bar.update()
    rows: list[tuple] = []
    splits = matches = 0
    result = FamilyResult([m.name for m in members], 0, 0, len(x), source)
    for a, b, kind in pairs:
        Wa, Wb = a.loaded.sae.W_dec.detach(), b.loaded.sae.W_dec.detach()
        if kind == SPLIT:
            rel = split_relations(Wa, Wb, active[a.name], active[b.name], cfg.min_cosine, cfg.min_coactivation, bar.update)
            rows += _rows(SPLIT, a.run_id, b.run_id, rel)
            splits += len(rel)
            continue
        for one, other in ((a, b), (b, a)):
            W1, W2 = (Wa, Wb) if one is a else (Wb, Wa)
            rel = match_relations(W1, W2, active[one.name], active[other.name], cfg.match_cosine, cfg.min_coactivation, bar.update)
            rows += _rows(MATCH, one.run_id, other.run_id, rel)
            matches += len(rel)
            fired = int((np.asarray(active[one.name].sum(axis=0)).ravel() > 0).sum())
            result.universality.append(Universality(one.name, other.name, len(rel), fired, float(rel.cosine.mean()) if len(rel) else 0.0))
    bar.close()
    runs = [m.run_id for m in members]
    with Session(engine) as s, s.begin():  # replace the relations among these runs in one transaction
        s.execute(delete(FeatureRelation).where(and_(FeatureRelation.source_run_id.in_(runs), FeatureRelation.target_run_id.in_(runs))))
        load_rows(s, FeatureRelation, RELATION_COLUMNS, rows, len(rows), "storing relations", progress)
        for m in members:
            mark_changed(s, m.sae_id)  # their pages link to each other now
    result.splits, result.matches, result.seconds = splits, matches, time.perf_counter() - t0
    narrowest = members[0].run_id
    children: dict[int, int] = {}
    for kind, source_run, source, *_ in rows:
        if kind == SPLIT and source_run == narrowest:
            children[source] = children.get(source, 0) + 1
    if children:
        result.example = (members[0].name, max(children, key=lambda f: (children[f], -f)))
    return result


def _rows(kind: str, source_run: int, target_run: int, rel: Relations) -> list[tuple[str, int, int, int, int, float, float, int]]:
    return [
        (kind, source_run, s, target_run, t, c, co, n)
        for s, t, c, co, n in zip(
            rel.source.tolist(), rel.target.tolist(), rel.cosine.tolist(), rel.coactivation.tolist(), rel.co_fired.tolist()
        )
    ]
