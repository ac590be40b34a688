"""`saescope demo --circuits`: from the demo's atlas to an attribution graph of a two-step prompt.

    transcoders for every layer (one model pass) -> their evaluation -> the prompt's graph (traced, pruned,
    checked by ablation, stored) -> the transcoder layers the graph's features sit on mined and explained

Each step skips finished work (a transcoder set with its transcoders.json, an eval_transcoders.json, a stored
graph, a mined and explained layer), so a re-run or a run after a crash picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from sae_core.cache import CacheConfig
from sae_core.config import DemoConfig, ExplainConfig, TrainConfig
from sae_core.explain.stage import explain
from sae_core.feature_stats import StatsConfig
from sae_core.mine import MineConfig, mine
from sae_core.model import DEFAULT_MODEL, load_model
from sae_core.sae.base import paper_lr
from sae_core.shard_writer import write_json

from .trace import path_in_words, trace_with_progress, verification_lines

# Transcoders learn their MLP's output slower than an SAE its input: on layer 5 over 192k tokens the batch FVU
# was 0.74 at the width's default rate (4e-4 for 4,096 latents), 0.59 at 4x and 0.56 at 8x (bench/RESULTS.md).
CIRCUITS_LR_SCALE = 8.0
CIRCUITS_LATENTS = 4096
CIRCUITS_BATCH_SIZE = 1024  # tokens a step, as the demo's SAEs: more steps over few tokens
EVAL_FILE = "eval_transcoders.json"


@dataclass
class CircuitsResult:
    transcoders: Path
    graph_url: str
    mined: dict[int, str]  # layer -> the store name its transcoder's features were mined under


def transcoder_train_config(cfg: DemoConfig) -> TrainConfig:
    """The demo's recipe for its transcoders: skip transcoders of CIRCUITS_LATENTS latents, k as the demo's SAE,
    1,024 tokens a step at 8x the width's default rate, encoder GEMMs in bf16 numerics (fast on bf16 hardware)."""
    lr = paper_lr(CIRCUITS_LATENTS) * CIRCUITS_LR_SCALE
    return TrainConfig(
        n_latents=CIRCUITS_LATENTS,
        k=cfg.k,
        tokens=cfg.circuits_tokens,
        batch_size=CIRCUITS_BATCH_SIZE,
        lr=lr,
        bf16=True,
        device=cfg.device,
        transcoders="all",
    )


def check_prompt(cfg: DemoConfig) -> None:
    """Refuse a prompt the trace step would refuse, before the demo spends its time on the atlas and the transcoders:
    an empty one, or one with more words than the trace takes tokens (a word is at least one token)."""
    from sae_core.circuits.trace import TraceConfig
    from sae_core.errors import SaescopeError

    limit = TraceConfig(prompt=cfg.circuits_prompt, transcoders=".").max_prompt_tokens  # raises for an empty prompt
    if len(cfg.circuits_prompt.split()) > limit:
        raise SaescopeError(f"--circuits-prompt has more than {limit} words; attribution graphs take at most {limit} tokens")


def layer_name(layer: int, model: str = DEFAULT_MODEL) -> str:
    """The store name of the demo's transcoder of `layer` (smollm2-135m-L12-tc-4k, beside smollm2-135m-L8-topk-8k)."""
    return f"{Path(model).name}-L{layer}-tc-{CIRCUITS_LATENTS // 1024}k"


def run_circuits(
    cfg: DemoConfig,
    console: Console,
    run_dir: Path,
    *,
    model: str = DEFAULT_MODEL,
    corpus: str = "demo",
    node_threshold: float | None = None,
) -> CircuitsResult:
    """The four steps on `model` and `corpus` (the demo's bundled ones; tests pass a tiny model), the graph pruned
    at `node_threshold` (None: `saescope trace`'s default)."""
    from sae_core.circuits.trace import TraceConfig
    from sae_core.evaluation.transcoders import evaluate_transcoders
    from sae_core.train_transcoders import SUMMARY, layer_folders, train_transcoders

    def step(n: int, text: str) -> None:
        console.print(f"[bold cyan]\\[circuits {n}/4][/] {text}")  # escaped: rich reads [circuits ...] as a style

    folder = run_dir / "transcoders"
    train_cfg = transcoder_train_config(cfg)
    step(1, f"skip transcoders for every layer, {CIRCUITS_LATENTS:,} latents, k={cfg.k}, {cfg.circuits_tokens:,} tokens -> {folder}")
    if (folder / SUMMARY).exists():
        console.print("      transcoders trained: skipped")
    else:
        stream = CacheConfig(model=model, corpus=corpus, tokens=cfg.circuits_tokens, device=cfg.device, model_dtype=cfg.model_dtype)
        trained = train_transcoders(train_cfg, stream, "all", folder, resume=(folder / "checkpoint.pt").exists())
        fvus = [s.fvu for s in trained.last.values()]
        if fvus:
            mean = sum(fvus) / len(fvus)
            console.print(f"      {len(trained.layers)} layers, last batch FVU of the MLP outputs mean {mean:.3f}, worst {max(fvus):.3f}")

    step(2, f"evaluation on {cfg.eval_tokens:,} held-out tokens: each layer's FVU, the CE loss with every MLP replaced")
    if (folder / EVAL_FILE).exists():
        report = json.loads((folder / EVAL_FILE).read_text())
        console.print(f"      {EVAL_FILE} present: skipped")
    else:
        report = evaluate_transcoders(folder, tokens=cfg.eval_tokens, device=cfg.device)
        write_json(folder / EVAL_FILE, report)  # atomic: a killed run never leaves half a file that the re-run skips on
    fvu = list(report["fvu"].values())
    console.print(
        f"      FVU of the MLP outputs mean {sum(fvu) / len(fvu):.3f}, worst {max(fvu):.3f}; CE clean {report['ce_clean']:.3f}, "
        f"every MLP replaced {report['ce_replaced']:.3f}, MLPs zeroed {report['ce_zeroed']:.3f} (CE score {report['ce_score']:.3f})"
    )

    step(3, f"attribution graph of {cfg.circuits_prompt!r}")
    trace_cfg = TraceConfig(prompt=cfg.circuits_prompt, transcoders=folder, db=cfg.db, device=cfg.device)
    if node_threshold is not None:
        trace_cfg = dataclasses.replace(trace_cfg, node_threshold=node_threshold)
    result = trace_with_progress(trace_cfg, console)
    done = "stored graph: skipped" if result.reused else f"built in {result.seconds:.1f} s"
    console.print(
        f"      {done}: nodes {result.nodes_before:,} -> {result.nodes_after:,}, edges {result.edges_before:,} -> "
        f"{result.edges_after:,} after pruning; replacement score {result.replacement_score:.3f}, "
        f"completeness {result.completeness_score:.3f}"
    )
    for line in verification_lines(result.verification):
        console.print(f"      {line}", highlight=False)

    layers = sorted({int(n["layer"]) for n in result.graph["nodes"] if n["kind"] == "feature"})
    step(4, f"mining and explaining the {len(layers)} layers with features in the graph ({cfg.circuits_mine_tokens:,} tokens each)")
    folders = layer_folders(folder)
    mined: dict[int, str] = {}
    lm = load_model(model, cfg.device, cfg.model_dtype) if layers else None  # once for every layer's mining
    for layer in layers:
        name = layer_name(layer, model)
        run = mine(
            folders[layer],
            MineConfig(
                tokens=cfg.circuits_mine_tokens,
                name=name,
                db=cfg.db,
                stats=StatsConfig(),
                device=cfg.device,
                model_dtype=cfg.model_dtype,
            ),
            lm=lm,
        )
        explained = explain(name, ExplainConfig(db=cfg.db))
        what = "already mined" if run.skipped else f"{run.alive:,} of {run.n_latents:,} features fired"
        console.print(f"      layer {layer}: {name}, {what}, {explained.explained:,} explained ({explained.skipped:,} already were)")
        mined[layer] = name
    path = path_in_words(cfg.db, result.slug)
    if path:
        console.print("      strongest path: " + escape(" -> ".join(path)), highlight=False)
    console.print(f"      graph: {result.url} (hover a node for its explanation, click it for its page, 'steer' to test it)")
    return CircuitsResult(folder, result.url, mined)
