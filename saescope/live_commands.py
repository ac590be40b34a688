"""`saescope activations`, `saescope steer`, `saescope chat` and `saescope sweep`: the live runtime from the command line, in this process,
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
INTERVENTION_HELP = (
    "An intervention FEATURE:MODE:VALUE[@CONDITION], MODE clamp, add, scale, cap or ortho; CONDITION gen, prompt, F>T or SAE:F>T"
)


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
            _arg("message", str, typer.Argument(..., help="The user's message.")),
            SAE_NAME,
            _arg("system", str, typer.Option("", "--system", help="A system message before it (none by default).")),
            _arg(
                "feature",
                list[str],
                typer.Option([], "--feature", help=INTERVENTION_HELP + "; repeat for more features."),
            ),
            *command_options(GenerationConfig),
            *_pick(ServeConfig, ("db",)),
            *_pick(LiveConfig, LIVE_MODEL),
        ]
    )
    def chat(
        message: str,
        sae: str,
        system: str,
        feature: list[str],
        db: str | None,
        live_device: str,
        live_model_dtype: str,
        **values: Any,
    ) -> None:
        """One chat turn through the model's chat template: the assistant's default reply, then its reply with the
        features changed, each streamed to the terminal as it is generated (as /saes/{sae}/chat does)."""
        import sys

        from sae_core.live.interventions import Intervention
        from sae_core.live.streaming import TextDeltas, chat_prompt_ids, check_messages

        interventions = [Intervention.parse(spec) for spec in feature]
        settings = from_options(GenerationConfig, values)
        runtime = _runtime(db, live_device, live_model_dtype)
        messages = check_messages(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}])
        tokenizer = runtime.model(runtime.sae(sae).run.model).tokenizer
        prompt_ids = chat_prompt_ids(tokenizer, messages, runtime.cfg.max_prompt_tokens)
        specs = " ".join(iv.spec() for iv in interventions) or "(no interventions)"
        deltas: dict[str, TextDeltas] = {}

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        def on_token(which: str, token_id: int) -> None:
            if which not in deltas:
                for other in deltas.values():
                    other.flush()
                    print(flush=True)
                title = "default" if which == "default" else f"steered  {specs}"
                console.print(f"[bold]{title}[/]", emoji=False, highlight=False)
                deltas[which] = TextDeltas(tokenizer, write)
            deltas[which].add(token_id)

        runtime.generate(sae, "", interventions, settings, on_token=on_token, prompt_ids=prompt_ids)
        for d in deltas.values():
            d.flush()
        print(flush=True)

    @app.command()
    @with_signature(
        [
            _arg("prompt", str, typer.Argument(..., help="The prompt to continue.")),
            SAE_NAME,
            _arg(
                "feature",
                list[str],
                typer.Option([], "--feature", help=INTERVENTION_HELP + "; repeat for more features."),
            ),
            _arg(
                "frozen_attention",
                bool,
                typer.Option(False, "--frozen-attention", help="Also the steered run with the unsteered run's attention patterns."),
            ),
            *command_options(GenerationConfig),
            *_pick(ServeConfig, ("db",)),
            *_pick(LiveConfig, LIVE_MODEL),
        ]
    )
    def steer(
        prompt: str,
        sae: str,
        feature: list[str],
        frozen_attention: bool,
        db: str | None,
        live_device: str,
        live_model_dtype: str,
        **values: Any,
    ) -> None:
        """Continue PROMPT twice, without and with the features changed at the SAE's hook, and print both."""
        from sae_core.live.interventions import Intervention

        interventions = [Intervention.parse(spec) for spec in feature]
        settings = from_options(GenerationConfig, values)
        runtime = _runtime(db, live_device, live_model_dtype)
        result = runtime.generate(sae, prompt, interventions, settings, frozen_attention=frozen_attention)
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
        if result.frozen is not None:
            console.print(f"[bold]steered, frozen attention[/]  ({result.frozen.stopped})", highlight=False)
            print(prompt + result.frozen.text)

    @app.command()
    @with_signature(
        [
            SAE_NAME,
            _arg("feature", str, typer.Option(..., "--feature", help=INTERVENTION_HELP + " (its VALUE is replaced by each strength).")),
            _arg("strength", list[float], typer.Option(..., "--strength", help="A strength to try; repeat (at most 16).")),
            _arg("prompt", list[str], typer.Option([], "--prompt", help="A prompt to sweep over; repeat (default: a built-in set of 8).")),
            _arg(
                "heldout",
                list[str],
                typer.Option([], "--heldout", help="A held-out prompt to check the suggestion on (default: 4 built in)."),
            ),
            _arg("no_heldout", bool, typer.Option(False, "--no-heldout", help="No held-out check of the suggestion.")),
            _arg(
                "target_feature",
                int | None,
                typer.Option(None, "--target-feature", help="Lift read on this feature (default: the steered one)."),
            ),
            _arg("target_token", str | None, typer.Option(None, "--target-token", help="Lift = this token's probability instead.")),
            _arg("new_tokens", int, typer.Option(32, "--new-tokens", min=1, help="Tokens generated per prompt and strength (greedy).")),
            _arg(
                "max_cost",
                float,
                typer.Option(1.0, "--max-cost", help="Fluency cost (nats/token) above the unsteered the suggestion may spend."),
            ),
            *_pick(ServeConfig, ("db",)),
            *_pick(LiveConfig, LIVE_MODEL),
        ]
    )
    def sweep(
        sae: str, feature: str, strength: list[float], prompt: list[str], heldout: list[str], no_heldout: bool,
        target_feature: int | None, target_token: str | None, new_tokens: int, max_cost: float, db: str | None, live_device: str,
        live_model_dtype: str,
    ) -> None:  # fmt: skip
        """Run one intervention at several strengths over a set of prompts: lift, KL and fluency cost per strength, and a suggestion.
        A sweep that finishes is stored (its permalink shows it on the sweep page); the same sweep again is read from the store."""
        from sae_core.live.interventions import Intervention
        from sae_core.live.sweep import SweepRequest, sweep_permalink

        if no_heldout and heldout:
            raise typer.BadParameter("--heldout and --no-heldout exclude each other")
        request = SweepRequest(
            sae, Intervention.parse(feature), tuple(strength), tuple(prompt) or None, () if no_heldout else tuple(heldout) or None,
            target_feature, target_token, new_tokens, max_cost,
        )  # fmt: skip
        result = _runtime(db, live_device, live_model_dtype).sweep(request)
        lift = "P(token)" if result.lift_kind == "token" else "lift"
        console.print(f"{'strength':>10} {lift:>9} {'KL':>8} {'fluency':>8}", highlight=False)
        for p in [result.baseline, *result.points]:
            label = "unsteered" if p.strength is None else f"{p.strength:g}"
            console.print(f"{label:>10} {p.lift:9.3f} {p.kl:8.3f} {p.fluency:8.3f}   {p.texts[0][:50]!r}", highlight=False, markup=False)
        if result.suggested is None:
            console.print("no strength lifts the target within the cost allowed", markup=False)
        else:
            console.print(f"suggested strength: {result.suggested:g}", highlight=False)
            if len(result.heldout) == 2:
                base, chosen = result.heldout
                console.print(
                    f"held out ({len(result.heldout_prompts)} prompts): lift {base.lift:.3f} -> {chosen.lift:.3f}, "
                    f"KL {chosen.kl:.3f}, fluency {base.fluency:.3f} -> {chosen.fluency:.3f}",
                    highlight=False,
                )
        if result.stored:
            console.print(f"read from the store: computed {result.computed_at} (the model did not run)", highlight=False, markup=False)
        elif result.stopped is None:
            console.print(f"stored: computed {result.computed_at} in {result.seconds:.1f} s", highlight=False, markup=False)
        else:
            console.print(f"stopped early ({result.stopped}): partial, not stored", highlight=False, markup=False)
        console.print(f"permalink: {sweep_permalink(request)}", highlight=False, markup=False)
