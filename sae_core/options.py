"""Every option defined once: a config dataclass field carries its default, type and help, and the
CLI and docs/configuration.md are built from it.

    tokens: int = option(1_000_000, "Tokens to process (rounded up to whole windows).")

The fields keep plain metadata (help text, the flag's settings as a dict): the library never imports
the command line. saescope/options.py turns them into typer options.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, Field, field
from functools import lru_cache
from typing import Any, Callable

HELP, TYPER = "help", "typer"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    cli: bool = True,
    **typer_kwargs: Any,
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
