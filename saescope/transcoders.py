"""`saescope train --transcoders all|0,1,5` (a transcoder per layer in one pass; `train` hands over to
`train_transcoders_command`) and `saescope eval-transcoders --out DIR` (each layer's FVU of its MLP output, the CE loss
with every MLP replaced at once). Registered on the CLI by saescope/cli.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sae_core.config import CacheConfig, TrainConfig
from sae_core.errors import SaescopeError

console = Console(stderr=True, soft_wrap=True)


def train_transcoders_command(cfg: TrainConfig, streaming: dict[str, Any], activations: Path | None, out: Path, resume: bool) -> None:
    """What `saescope train --transcoders ...` runs: activations stream from the model (--model, --corpus, --tokens)."""
    from sae_core.train_transcoders import train_transcoders

    if activations is not None:
        raise SaescopeError(
            "--transcoders streams from the model (every layer's MLP input and output in one pass): leave out --activations"
        )
    if cfg.tokens is None:
        raise SaescopeError("--transcoders needs --tokens N: the model runs over N corpus tokens once")
    assert cfg.transcoders is not None
    stream = CacheConfig(model=streaming["model"], corpus=streaming["corpus"], tokens=cfg.tokens, device=cfg.device)
    result = train_transcoders(cfg, stream, cfg.transcoders, out, resume=resume)
    fvus = {layer: step.fvu for layer, step in result.last.items()}  # empty when the checkpoint was already at the end
    worst = max(fvus, key=fvus.__getitem__, default=None)
    mean = sum(fvus.values()) / len(fvus) if fvus else float("nan")
    console.print(
        f"trained {len(result.layers)} transcoders, {result.steps} steps ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s): "
        f"FVU of the MLP outputs mean {mean:.4f}, worst {fvus[worst] if worst is not None else float('nan'):.4f} (layer {worst}) "
        f"-> {escape(str(out))}/layer_<L>"
    )


def register(app: typer.Typer, console: Console) -> None:
    @app.command("eval-transcoders")
    def eval_transcoders(
        out: Path = typer.Option(..., "--out", help="Folder of `saescope train --transcoders` (its transcoders.json names the layers)."),
        tokens: int = typer.Option(16384, help="Held-out tokens (corpus windows after the trained ones)."),
        batch_size: int = typer.Option(8, help="Windows per forward pass."),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    ) -> None:
        """Each layer's FVU of its MLP output through its transcoder, and the CE loss with every MLP replaced by its
        transcoder at once (beside the clean CE and the CE with those MLPs zeroed); writes eval_transcoders.json."""
        from sae_core.evaluation.transcoders import evaluate_transcoders

        report = evaluate_transcoders(out, tokens=tokens, batch_size=batch_size, device=device)
        (Path(out) / "eval_transcoders.json").write_text(json.dumps(report, indent=2))
        for layer, fvu in report["fvu"].items():
            console.print(f"layer {layer}: FVU {fvu:.4f}")
        console.print(
            f"CE clean {report['ce_clean']:.4f}, every MLP replaced {report['ce_replaced']:.4f}, "
            f"those MLPs zeroed {report['ce_zeroed']:.4f}: "
            f"CE score {report['ce_score']:.3f} over {report['tokens']:,} held-out tokens"
        )
