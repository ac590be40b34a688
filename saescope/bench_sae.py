"""`saescope bench-sae --sae NAME [--seed N]`: the benchmark suite (sae_core/evaluation) on one stored SAE;
the results go into the store (one row per SAE and seed) and, as SAEBench JSON, into the SAE's folder.
Registered on the CLI by saescope/cli.py."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sae_core.evaluation.config import BenchConfig

from .options import command_options, from_options, with_signature

GROUPS = ("core", "sparse probing", "meta-SAE", "interpretability", "absorption")


def register(app: typer.Typer, console: Console) -> None:
    @app.command("bench-sae")
    @with_signature(command_options(BenchConfig, sae={"default": ...}))
    def bench_sae(**values: Any) -> None:
        """SAEBench's metrics that hold up, on CPU: core (reconstruction, shrinkage, CE/KL, frequencies), k-sparse probing
        (k = 1, 2, 5, 20), a meta-SAE on the decoder rows, N2G / LLM interpretability, first-letter absorption where the
        model's probe is accurate enough. Stored per SAE and seed; SAEBench JSON in the SAE's folder (saebench/seed<N>/)."""
        from rich.table import Table

        from sae_core.evaluation import saebench_json
        from sae_core.evaluation.result import METRICS
        from sae_core.evaluation.suite import run_suite
        from sae_core.store import db
        from sae_core.store.benchmarks import save_benchmark

        cfg = from_options(BenchConfig, values)
        engine = db.open_store(cfg.db)
        result, folder = run_suite(cfg, engine=engine)
        save_benchmark(engine, result.stored())
        table = Table(title=f"{cfg.sae}, seed {cfg.seed}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for group in GROUPS:
            for name, (g, _meaning) in METRICS.items():
                if g == group and name in result.metrics:
                    table.add_row(f"{group}: {name}", f"{result.metrics[name]:,.4f}")
        console.print(table)
        interp = result.details.get("interpretability", {})
        if "llm_usage" in interp:
            used = interp["llm_usage"]
            source = interp.get("llm_detection_source") or interp.get("llm_detection", "")
            console.print(f"LLM detection: {escape(source)}; {used['requests']} requests, {used['total_tokens']:,} tokens")
        ab = result.details.get("absorption", {})
        if result.absorption_valid is False:
            console.print(f"[yellow]absorption not measured:[/] {escape(ab.get('skipped', ''))}")
        seconds = result.details.get("seconds", {})
        console.print("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f" (total {sum(seconds.values()):.0f} s)")
        if folder is not None:
            sae_cfg = result.saebench[0]["sae_cfg_dict"] if result.saebench else {}
            paths = saebench_json.write_files(result, sae_cfg, folder)
            console.print(f"stored in the store (seed {cfg.seed}); SAEBench JSON: {escape(str(paths[0].parent))}")
        else:
            console.print(f"stored in the store (seed {cfg.seed}); the SAE's folder is not on this machine, so no SAEBench JSON files")
