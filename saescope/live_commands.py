"""`saescope activations` and `saescope steer`: the live runtime from the command line, in this process,
over the store's SAEs (the same weights the pages describe). Registered on the CLI by saescope/cli.py;
nothing heavy is imported until a command runs, so `saescope --help` stays instant."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from sae_core.config import GenerationConfig, LiveConfig, ServeConfig

from .options import cli_fields, command_options, from_options, parameter, with_signature

if TYPE_CHECKING:
    from sae_core.live.runtime import LiveRuntime

LIVE_MODEL = ("live_device", "live_model_dtype")


def _arg(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _pick(cls: type, names: tuple[str, ...]) -> list[inspect.Parameter]:
    return [parameter(f, tp) for f, tp in cli_fields(cls) if f.name in names]


SAE_NAME = _arg("sae", str, typer.Option(..., "--sae", help="The SAE's name in the store (as in its URL /saes/NAME)."))


def _runtime(db: str | None, live_device: str, live_model_dtype: str) -> LiveRuntime:
    from sae_core.live.runtime import LiveRuntime
    from sae_core.store import db as store_db

    return LiveRuntime(LiveConfig(live_device=live_device, live_model_dtype=live_model_dtype), engine=store_db.open_store(db))


def register(app: typer.Typer, console: Console) -> None:
    @app.command()
    @with_signature(
        [
            _arg("text", str, typer.Argument(..., help="The text to read.")),
            SAE_NAME,
            _arg("feature", int | None, typer.Option(None, "--feature", help="Also print this feature's activation on every token.")),
            _arg("top", int, typer.Option(5, "--top", min=1, max=64, help="Strongest features listed per token.")),
            *_pick(ServeConfig, ("db",)),
            *_pick(LiveConfig, LIVE_MODEL),
        ]
    )
    def activations(text: str, sae: str, feature: int | None, top: int, db: str | None, live_device: str, live_model_dtype: str) -> None:
        """The SAE's strongest features on each token of TEXT (and one feature's activation on every token)."""
        result = _runtime(db, live_device, live_model_dtype).encode(sae, text, feature, top)
        for pos, tok in enumerate(result.tokens):
            feats = "(not encoded: first position)" if tok.skipped else "  ".join(f"#{i} {a:.2f}" for i, a in tok.features)
            extra = f"  [#{feature}: {result.feature_acts[pos]:.3f}]" if result.feature_acts is not None else ""
            console.print(f"{pos:4d} {tok.text!r:>16}  {feats}{extra}", highlight=False, markup=False)
        if result.truncated:
            note = f"note: read the text's first {len(result.tokens)} tokens; {result.truncated} more are past the limit"
            console.print(note, markup=False)

    @app.command()
    @with_signature(
        [
            _arg("prompt", str, typer.Argument(..., help="The prompt to continue.")),
            SAE_NAME,
            _arg(
                "feature",
                list[str],
                typer.Option(
                    [], "--feature", help="An intervention FEATURE:MODE:VALUE, MODE one of clamp, add, scale; repeat for more features."
                ),
            ),
            *command_options(GenerationConfig),
            *_pick(ServeConfig, ("db",)),
            *_pick(LiveConfig, LIVE_MODEL),
        ]
    )
    def steer(prompt: str, sae: str, feature: list[str], db: str | None, live_device: str, live_model_dtype: str, **values: Any) -> None:
        """Continue PROMPT twice, without and with the features changed at the SAE's hook, and print both."""
        from sae_core.live.interventions import Intervention

        interventions = [Intervention.parse(spec) for spec in feature]
        settings = from_options(GenerationConfig, values)
        result = _runtime(db, live_device, live_model_dtype).generate(sae, prompt, interventions, settings)
        if result.prompt_truncated:
            note = f"note: continued the prompt's last {len(result.prompt_tokens)} tokens; its first {result.prompt_truncated} were cut"
            console.print(note, markup=False)
        console.print(f"[bold]default[/]  ({result.default.stopped})", highlight=False)
        print(prompt + result.default.text)
        specs = " ".join(iv.spec() for iv in interventions) or "(no interventions)"
        console.print(f"[bold]steered[/]  {specs} ({result.steered.stopped})", emoji=False, highlight=False)
        print(prompt + result.steered.text)
        if result.diverges_at is not None:
            console.print(f"[dim]diverge at generated token {result.diverges_at}[/]")
