"""`saescope trace "prompt" --transcoders DIR` (a prompt's attribution graph, built, pruned, scored and stored under a
permalink: sae_core/circuits/trace.py) and `saescope graphs` (the stored ones). Registered by saescope/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from sae_core.circuits.trace import TraceConfig, TraceResult


def path_in_words(db: str | None, slug: str) -> list[str]:
    """The graph's strongest path, each node as the page says it (with its SAE and explanation where mined)."""
    from app.graphs import graph_detail, node_label
    from sae_core.store import db as store_db

    engine = store_db.open_store(db)
    try:
        with engine.connect() as conn, conn.begin():
            detail = graph_detail(conn, slug)
    finally:
        engine.dispose()
    return [node_label(detail["nodes"][i]) for i in detail["top_path"]]


def trace_with_progress(cfg: TraceConfig, console: Console) -> TraceResult:
    """sae_core's trace with a progress bar of the attribution targets on `console` (the CLI's and the demo's)."""
    from sae_core.circuits.trace import trace

    columns = (TextColumn("attributing"), BarColumn(), MofNCompleteColumn(), TextColumn("targets"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("attribution", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return trace(cfg, progress=progress)


def verification_lines(checked: dict | None) -> list[str]:
    """The graph's check by ablation (sae_core/circuits/verify.py) in words; nothing when it was not checked."""
    if not checked:
        return []
    lines = []
    if checked["checked"]:
        lines.append(
            f"faithfulness: {checked['matched']} of {checked['checked']} checked edges match (sign and within {checked['factor']:g}x)"
        )
    else:
        lines.append("faithfulness: no kept edge has a feature source to check")
    node = checked.get("strongest")
    if node:
        lines.append(
            f"ablating the strongest feature (layer {node['layer']} #{node['feature']} at position {node['pos']}) moves the top "
            f"logit by {node['measured']:+.3g}; the graph predicts {node['predicted']:+.3g} over all its paths "
            f"({'matches' if node['match'] else 'does not match'}), {node['predicted_direct']:+.3g} by the direct edge alone "
            f"({'matches' if node['match_direct'] else 'does not match'})"
        )
    return lines


def register(app: typer.Typer, console: Console) -> None:
    @app.command("trace")
    def trace_command(
        prompt: str = typer.Argument(..., help="The prompt whose next-token prediction the graph explains."),
        transcoders: Path = typer.Option(..., "--transcoders", help="Folder of `saescope train --transcoders all`."),
        db: str = typer.Option(None, "--db", help="Store URL (default: $SAESCOPE_DATABASE_URL, else the data directory's SQLite file)."),
        node_threshold: float = typer.Option(0.8, help="Keep the nodes carrying this share of the influence on the logits, in (0, 1]."),
        edge_threshold: float = typer.Option(0.98, help="Keep the edges carrying this share of the edge scores, in (0, 1]."),
        max_prompt_tokens: int = typer.Option(64, help="Refuse prompts longer than this many tokens."),
        max_n_logits: int = typer.Option(10, help="At most this many top output tokens as the graph's targets ..."),
        desired_logit_prob: float = typer.Option(0.95, help="... fewer once their probabilities add up to this."),
        max_feature_nodes: int = typer.Option(1024, help="Feature nodes chosen by influence during attribution; 0: every active feature."),
        attribute_position_0: bool = typer.Option(
            False,
            "--attribute-position-0/--no-attribute-position-0",
            help="Make the first position's features and errors nodes too (circuit-tracer leaves that position out: "
            "the model parks attention there and its features swamp the graph).",
        ),
        time_limit: float = typer.Option(600.0, help="Stop the build with an error after this many seconds."),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        force: bool = typer.Option(False, "--force", help="Build and store the graph again even if this permalink is stored."),
        verify_edges: int = typer.Option(
            20, help="Check this many of the strongest kept feature-source edges by ablation in the real model; 0: no check."
        ),
    ) -> None:
        """Build the attribution graph of a prompt over the transcoders of every layer (the local replacement model,
        Ameisen et al. 2025), prune it, score it and store it; prints the node and edge counts before and after
        pruning, the replacement and completeness scores, the strongest path and the page's URL. Tracing the same
        prompt with the same transcoders and settings again returns the stored graph."""
        from sae_core.circuits.trace import TraceConfig

        cfg = TraceConfig(
            prompt=prompt,
            transcoders=transcoders,
            db=db,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            max_prompt_tokens=max_prompt_tokens,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            max_feature_nodes=max_feature_nodes or None,
            attribute_position_0=attribute_position_0,
            time_limit_s=time_limit,
            device=device,
            force=force,
            verify_edges=verify_edges,
        )
        result = trace_with_progress(cfg, console)
        what = "stored graph (traced before; --force builds it again)" if result.reused else f"graph built in {result.seconds:.1f} s"
        console.print(f"{what}: {result.n_tokens} tokens of {escape(result.model)}")
        console.print(
            f"nodes {result.nodes_before:,} -> {result.nodes_after:,}, edges {result.edges_before:,} -> {result.edges_after:,} "
            f"after pruning (node threshold {node_threshold:g}, edge threshold {edge_threshold:g})"
        )
        pruned = result.pruned_scores
        console.print(
            f"replacement score {result.replacement_score:.3f}, completeness score {result.completeness_score:.3f}"
            + (f" (pruned graph: {pruned['replacement']:.3f}, {pruned['completeness']:.3f})" if pruned else "")
        )
        for line in verification_lines(result.verification):
            console.print(line, highlight=False)
        steps = path_in_words(db, result.slug)
        if steps:
            console.print("strongest path: " + escape(" -> ".join(steps)), highlight=False)
        console.print(f"page: {result.url} (serve the store with `saescope serve`)")

    @app.command("graphs")
    def graphs_command(
        db: str = typer.Option(None, "--db", help="Store URL (default: $SAESCOPE_DATABASE_URL, else the data directory's SQLite file)."),
        limit: int = typer.Option(50, help="Show at most this many, newest first."),
    ) -> None:
        """List the attribution graphs in the store (`saescope trace` stores them), newest first."""
        from sae_core.store import db as store_db
        from sae_core.store import graphs as store_graphs

        engine = store_db.open_store(db)
        try:
            with engine.connect() as conn:
                rows = store_graphs.list_graphs(conn, limit)
        finally:
            engine.dispose()
        if not rows:
            console.print('no graphs yet: `saescope trace "prompt" --transcoders DIR` builds one')
        for r in rows:
            console.print(
                f"/graphs/{r.slug}  {r.n_tokens} tokens, {r.nodes_after:,} nodes, {r.edges_after:,} edges, "
                f"replacement {r.replacement_score:.3f}: {escape(repr(r.prompt))}",
                highlight=False,
            )
