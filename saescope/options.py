"""The command line's half of "every option defined once": a config's fields (sae_core/options.py: default,
type, help) become typer options here.

`command_options(Config, ...)` turns a config's fields into typer options (nested config fields are
flattened: MineConfig.stats gives --top-n etc.), and `from_options` builds the config back from the
parsed values. We kept typer rather than moving to tyro or simple-parsing: the CLI's help, its
generated reference (docs/cli.md by `typer utils docs`) and its error messages stay as users know
them, and reading dataclass fields into typer takes the fifty lines below.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import Field
from typing import Any, Callable

import typer

from sae_core.options import HELP, TYPER, _hints, _is_config, cli_fields, default_of

__all__ = ["LiteralHelpGroup", "cli_fields", "command_options", "from_options", "parameter", "with_signature"]


def parameter(f: Field, tp: Any, *, help_prefix: str = "", **overrides: Any) -> inspect.Parameter:
    """The typer option of one config field."""
    kwargs = {**f.metadata.get(TYPER, {}), **overrides}
    decls = kwargs.pop("param_decls", [])
    default = kwargs.pop("default", default_of(f))
    help_text = help_prefix + f.metadata.get(HELP, "")
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp, default=typer.Option(default, *decls, help=help_text or None, **kwargs)
    )


def command_options(cls: type, exclude: tuple[str, ...] = (), **overrides: dict) -> list[inspect.Parameter]:
    """Typer parameters for `cls`'s fields (less `exclude`); `overrides[name]` changes one's typer settings."""
    return [parameter(f, tp, **overrides.get(f.name, {})) for f, tp in cli_fields(cls) if f.name not in exclude]


def from_options(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """Build `cls` (and its nested configs) from parsed option values; `fixed` sets fields directly."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif _is_config(tp):
            kwargs[f.name] = from_options(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def with_signature(params: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give a `**values` command function the typer signature `params` (typer reads __signature__)."""

    def wrap(fn: Callable) -> Callable:
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return fn

    return wrap


class LiteralHelpGroup(typer.core.TyperGroup):
    """The CLI's root group: every help text is printed as written. Typer renders help as rich markup,
    which read "[batch, context, vocab]" as a style tag and dropped it ("full logits are )."); the
    texts of the whole tree (commands, sub-groups, options, arguments) are escaped once, when typer
    builds the group, so a command added anywhere is covered. `typer utils docs` (docs/cli.md) renders
    the same markup and gets the same texts."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _escape_help(self)


def _escape_help(command: Any) -> None:
    from rich.markup import escape

    # Only where rich renders the help: plain click help (TYPER_USE_RICH=0) would show the backslashes.
    if getattr(command, "rich_markup_mode", None) != "rich" or not typer.core.HAS_RICH or getattr(command, "_help_escaped", False):
        return
    command._help_escaped = True
    for owner in (command, *command.params):
        for attr in ("help", "short_help", "epilog"):
            if isinstance(text := getattr(owner, attr, None), str):
                setattr(owner, attr, escape(text))
    for sub in getattr(command, "commands", {}).values():
        _escape_help(sub)
