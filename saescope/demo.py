"""`saescope demo`: from nothing to a browsable atlas of the bundled model, every stage skipping work
whose output already exists (so a re-run, or a run after a crash, picks up where it stopped).

    fetch corpus -> cache activations -> train TopK SAE -> evaluate -> mine into the store -> explain -> map -> serve
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from sqlalchemy.engine import Engine

from sae_core import settings
from sae_core.cache import CacheConfig, build_cache
from sae_core.config import DemoConfig, ExplainConfig
from sae_core.corpus import fetch_demo
from sae_core.evaluate import RESULT as EVAL_RESULT
from sae_core.evaluate import EvalConfig, evaluate
from sae_core.explain.stage import explain
from sae_core.feature_stats import StatsConfig
from sae_core.interchange import CFG, WEIGHTS
from sae_core.mine import MineConfig, mine
from sae_core.model import DEFAULT_MODEL, LanguageModel, load_model
from sae_core.sae.base import paper_lr
from sae_core.train import TrainConfig, train


@dataclass
class DemoResult:
    run_dir: Path
    sae_dir: Path
    sae_name: str
    db_url: str
    graph_url: str | None = None  # --circuits: the two-step prompt's attribution graph


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    from sae_core.store import db as store_db

    console = console or Console(stderr=True)
    run_dir = settings.runs_dir() / "demo"
    cache_dir, sae_dir = run_dir / "cache", run_dir / cfg.name

    def stage(n: int, text: str) -> None:
        console.print(f"[bold cyan][{n}/6][/] {text}")

    store_db.make_engine(cfg.db)  # an unreachable database fails now, not after twenty minutes
    if cfg.circuits:
        from .demo_circuits import check_prompt

        check_prompt(cfg)  # likewise a prompt the graph step would refuse
    stage(1, "demo corpus")
    fetch_demo()
    lm = None

    stage(2, f"activations of {DEFAULT_MODEL} at {cfg.hook} over {cfg.cache_tokens:,} tokens -> {cache_dir}")
    manifest = cache_dir / "cache.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
        console.print("      cache complete: skipped")
    else:
        lm = load_model(DEFAULT_MODEL, cfg.device, cfg.model_dtype)
        build_cache(
            CacheConfig(hook=cfg.hook, corpus="demo", tokens=cfg.cache_tokens, device=cfg.device, model_dtype=cfg.model_dtype),
            cache_dir,
            lm=lm,
        )

    stage(3, f"TopK SAE, {cfg.n_latents:,} latents, k={cfg.k}, {cfg.train_tokens:,} training tokens -> {sae_dir}")
    if (sae_dir / CFG).exists() and (sae_dir / WEIGHTS).exists():
        console.print("      SAE trained: skipped")
    else:
        result = train(
            demo_train_config(cfg, cfg.n_latents),
            cache_dir,
            sae_dir,
            resume=(sae_dir / "checkpoint.pt").exists(),
        )
        last = result.last  # None when the checkpoint was already at the end
        done = f"      FVU {last.fvu:.3f}, dead {last.dead_fraction or 0:.1%}" if last else "      already trained (checkpoint at the end)"
        console.print(done)

    stage(4, f"evaluation on {cfg.eval_tokens:,} held-out tokens")
    if (sae_dir / EVAL_RESULT).exists():
        console.print("      eval.json present: skipped")
    else:
        lm = lm or load_model(DEFAULT_MODEL, cfg.device, cfg.model_dtype)
        ev = evaluate(sae_dir, EvalConfig(tokens=cfg.eval_tokens, device=cfg.device, model_dtype=cfg.model_dtype), lm=lm)
        console.print(f"      L0 {ev.l0:.1f}, FVU {ev.fvu:.3f}, CE loss recovered {ev.ce_score:.1%}, delta CE {ev.delta_ce:.3f}")
        if ev.probe_loss is not None:
            console.print(f"      probe loss {ev.probe_loss:.3f} nats, mean over {len(ev.probe_tasks)} tasks")

    stage(5, f"mining {cfg.mine_tokens:,} tokens into {store_db.redact(store_db.database_url(cfg.db))}")
    mined = mine(
        sae_dir,
        MineConfig(tokens=cfg.mine_tokens, name=cfg.name, db=cfg.db, stats=StatsConfig(), device=cfg.device, model_dtype=cfg.model_dtype),
        lm=lm,
    )
    console.print("      " + (mined.notes[0] if mined.skipped else f"{mined.alive:,} of {mined.n_latents:,} features fired"))

    stage(6, "N2G explanations of every fired feature, scored on held-out contexts, embedded for search")
    explained = explain(cfg.name, ExplainConfig(db=cfg.db))  # skips features already explained
    m = explained.metrics
    console.print(
        f"      {explained.explained:,} explained ({explained.skipped:,} already were); "
        f"mean held-out precision {m.get('n2g_precision') or 0:.3f}, recall {m.get('n2g_recall') or 0:.3f}"
    )
    from sae_core.relations.map import MapConfig, build_map

    # by co-firing: the 8k SAE's decoder rows are nearly orthogonal (nearest-neighbour cosine median 0.23, random
    # directions 0.16), so a decoder map is a featureless disk; what fires together forms islands (bench/RESULTS.md)
    map_cfg = MapConfig(db=cfg.db, neighbours="coactivation", keep_existing=True)
    mapped = build_map(cfg.name, map_cfg)  # a no-op once the live run has its map
    took = "already built" if mapped.skipped else f"{mapped.seconds:.0f} s"
    console.print(f"      map of the {mapped.n_points:,} fired features, {mapped.n_clusters} clusters ({took}): /saes/{cfg.name}/map")
    if cfg.family:
        _family(cfg, console, cache_dir, run_dir, lm)
    _steering_example(console, store_db.make_engine(cfg.db), cfg.name, lm)
    graph_url = None
    if cfg.circuits:
        from .demo_circuits import run_circuits

        graph_url = run_circuits(cfg, console, run_dir).graph_url
    return DemoResult(run_dir, sae_dir, cfg.name, store_db.database_url(cfg.db), graph_url)


# The demo's training run is short (1M tokens on a CPU), and at the paper's settings for long runs (4,096
# tokens a step, lr 2e-4 / sqrt(n / 2^14)) its SAEs barely leave their random start: after 244 steps the
# 8k SAE's decoder rows kept a median cosine of 0.93 to their initial random directions, two 2k SAEs of
# other seeds shared 1% of their features (nearest decoder cosine >= 0.5) and `demo --family` found 35
# relations 2k -> 8k and none 8k -> 32k. Four times the steps over the same tokens and four times the
# width's rate: the 2k SAEs reach FVU 0.12-0.13 instead of 0.17, their rows move to a median cosine of
# 0.21 to their start, and 38% of one seed's features have a match >= 0.5 in the other (bench/RESULTS.md).
DEMO_BATCH_SIZE = 1024
DEMO_LR_SCALE = 4.0


def demo_train_config(cfg: DemoConfig, width: int, seed: int = 0) -> TrainConfig:
    """The demo's recipe for its TopK SAE of `width` latents (the atlas's and the family's alike)."""
    lr = paper_lr(width) * DEMO_LR_SCALE  # scaled for a short run
    return TrainConfig(n_latents=width, k=cfg.k, tokens=cfg.train_tokens, device=cfg.device, seed=seed, batch_size=DEMO_BATCH_SIZE, lr=lr)


def family_names(cfg: DemoConfig) -> dict[int, str]:
    """Width -> store name of the family's SAEs: a quarter and four times the demo's width beside it
    (smollm2-135m-L8-topk-2k, -8k, -32k)."""
    suffix = f"-{cfg.n_latents // 1024}k"
    stem = cfg.name[: -len(suffix)] if cfg.name.endswith(suffix) else cfg.name
    return {w: cfg.name if w == cfg.n_latents else f"{stem}-{w // 1024}k" for w in (cfg.n_latents // 4, cfg.n_latents, cfg.n_latents * 4)}


def _family(cfg: DemoConfig, console: Console, cache_dir: Path, run_dir: Path, lm: LanguageModel | None) -> None:
    """`demo --family`: the narrower and the wider SAE trained on the same cache, mined and explained like the
    demo's, then their family relations (sae_core/relations/families.py); each step skips finished work."""
    from sae_core.config import FamilyConfig
    from sae_core.relations.families import build_families

    names = family_names(cfg)
    for width, name in names.items():
        if width == cfg.n_latents:
            continue
        console.print(
            f"[bold cyan]\\[family][/] {name}: TopK SAE, {width:,} latents, k={cfg.k}, on the same cache; evaluated, mined and explained"
        )
        folder = run_dir / name
        if not ((folder / CFG).exists() and (folder / WEIGHTS).exists()):
            # another seed than the demo's SAE: one seed gives a wider SAE the narrower one's random init as its first
            # rows (one RNG stream), and their matches would then be that shared start rather than learned splits
            train(
                demo_train_config(cfg, width, seed=width),
                cache_dir,
                folder,
                resume=(folder / "checkpoint.pt").exists(),
            )
        if not (folder / EVAL_RESULT).exists():  # before mining, which stores eval.json's metrics: /compare shows all three widths
            lm = lm or load_model(DEFAULT_MODEL, cfg.device, cfg.model_dtype)
            ev = evaluate(folder, EvalConfig(tokens=cfg.eval_tokens, device=cfg.device, model_dtype=cfg.model_dtype), lm=lm)
            console.print(f"      L0 {ev.l0:.1f}, FVU {ev.fvu:.3f}, CE loss recovered {ev.ce_score:.1%}, delta CE {ev.delta_ce:.3f}")
        mine(
            folder,
            MineConfig(tokens=cfg.mine_tokens, name=name, db=cfg.db, stats=StatsConfig(), device=cfg.device, model_dtype=cfg.model_dtype),
            lm=lm,
        )
        explain(name, ExplainConfig(db=cfg.db))
    built = build_families(list(names.values()), FamilyConfig(db=cfg.db, device=cfg.device, model_dtype=cfg.model_dtype))
    example = f"; e.g. /saes/{built.example[0]}/features/{built.example[1]}/family" if built.example else ""
    console.print(f"      family relations: {built.splits:,} parent -> child across {', '.join(built.saes)}{example}")


def _steering_example(console: Console, engine: Engine, name: str, lm: LanguageModel | None) -> None:
    """The live pages, and a steering example of this SAE with its permalink (sae_core/live/example.py): run
    here when the model is loaded anyway (a stage ran), else only linked (a re-run stays quick)."""
    from sae_core.errors import SaescopeError
    from sae_core.live.example import example_request, steering_example

    console.print(f"      live pages: /saes/{name}/inference (features on your text), /saes/{name}/steer")
    try:
        request = example_request(engine, name)
        example = steering_example(engine, name, lm) if request is not None and lm is not None else None
    except SaescopeError as exc:  # the atlas is complete without it
        console.print(f"      no steering example: {exc}")
        return
    if request is None:
        return
    iv = request.intervention
    console.print(f"      steering example: feature #{iv.feature} (its top contexts peak on {request.word!r}) clamped to {iv.value:g}")
    if example is not None:
        r = example.result
        console.print(f"        default: {''.join(r.prompt_tokens)}{r.default.text}", markup=False, highlight=False)
        console.print(f"        steered: {''.join(r.prompt_tokens)}{r.steered.text}", markup=False, highlight=False)
    console.print(f"        permalink: {request.permalink}", markup=False, highlight=False)
