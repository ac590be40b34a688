"""Every option defined once: a config dataclass field carries its default, type and help, and the
CLI and docs/configuration.md are built from it.

    tokens: int = option(1_000_000, "Tokens to process (rounded up to whole windows).")

`command_options(Config, ...)` turns a config's fields into typer options (nested config fields are
flattened: MineConfig.stats gives --top-n etc.), and `from_options` builds the config back from the
parsed values. We kept typer rather than moving to tyro or simple-parsing: the CLI's help, its
generated reference (docs/cli.md by `typer utils docs`) and its error messages stay as users know
them, and reading dataclass fields into typer takes the fifty lines below.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import MISSING, Field, field
from functools import lru_cache
from typing import Any, Callable

import typer

HELP, TYPER = "help", "typer"


def option(
    default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None, cli: bool = True, **typer_kwargs
) -> Any:
    """A config field with its help text; `typer_kwargs` (min=..., show_default=..., a flag name as
    param_decls=[...]) go to typer.Option; cli=False keeps a field out of the command line."""
    meta = {HELP: help, TYPER: typer_kwargs, "cli": cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def cli_fields(cls: type) -> list[tuple[Field, Any]]:
    """(field, type) of every field of `cls` on the command line, nested configs flattened."""
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_config(tp):
            out += cli_fields(tp)
        elif f.metadata.get("cli", True) and not f.name.startswith("_"):
            out.append((f, tp))
    return out


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def parameter(f: Field, tp: Any, *, help_prefix: str = "", **overrides) -> inspect.Parameter:
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


def _type_name(tp: Any) -> str:
    """A field's type in words that fit a Markdown table cell (no `|`)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def markdown_table(cls: type, title: str) -> str:
    """One config's options as a Markdown table: the docs/configuration.md section for `cls`."""
    rows = [f"### {title} (`{cls.__module__}.{cls.__qualname__}`)", "", "| option | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_config(tp):
            rows.append(f"| `{f.name}` | {tp.__name__} | | the options of `{tp.__name__}` below |")
            continue
        typer_kwargs = f.metadata.get(TYPER, {})
        flag = (typer_kwargs.get("param_decls") or [f"--{f.name.replace('_', '-')}"])[0]
        name = f"`{flag}`" if f.metadata.get("cli", True) else f"`{f.name}` (not on the command line)"
        shown = typer_kwargs.get("show_default")
        default = shown if isinstance(shown, str) else repr(default_of(f))
        type_name = _type_name(tp)
        rows.append(f"| {name} | {type_name} | {default} | {f.metadata.get(HELP, '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"


# Options several stages share, defined here once.
def device_option() -> Any:
    return option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.")


def model_dtype_option() -> Any:
    return option("auto", "dtype the model computes in: auto (bf16 where the hardware computes it natively), float32, bfloat16.")


def db_option() -> Any:
    return option(None, "Database URL (default: $SAESCOPE_DATABASE_URL, else SQLite in the data directory).", param_decls=["--db"])


def model_option() -> Any:
    return option("smollm2-135m", "smollm2-135m (bundled), a .gguf file, a model folder or a hub id.")


def hook_option() -> Any:
    return option("blocks.8.hook_resid_post", "Hook point: blocks.<layer>.hook_resid_post (layers count from 0).")


def corpus_option() -> Any:
    return option("demo", "demo, demo:<part>, a .txt/.jsonl file, a folder of .txt files, or hf:<dataset>.")


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
