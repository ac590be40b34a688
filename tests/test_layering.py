"""The layering the code keeps, read from the source (every import statement, including those inside
functions and under TYPE_CHECKING: a type a module names is a dependency of it too):

- no import circles among the modules of sae_core, app and saescope, nor among their subpackages
  (sae_core's store/, explain/, sae/ ..., app's live/, accounts/ ... each taken as one unit beside the
  top-level modules);
- sae_core is a library: it imports neither typer, rich nor the web app (`app`), nor the entry points (`saescope`);
- the web app does not import the entry points (`saescope`), which sit on top of both.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules(package: str) -> dict[str, Path]:
    """Every module of `package` (a top-level folder of the repository) by dotted name."""
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file. `from X import y` yields X.y where y is a
    module of the repository (`from . import db` inside a package imports db, not the package's
    __init__ again), else X."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{alias.name}" for alias in node.names if is_module(f"{source}.{alias.name}")]
            out += [(m, node.lineno) for m in submodules]
            if len(submodules) < len(node.names):
                out.append((source, node.lineno))
    return out


def graph(package: str, unit=lambda m: m) -> dict[str, dict[str, str]]:
    """unit -> {unit it imports: where (file:line)}, among the modules of `package` mapped by `unit`."""
    mods = modules(package)
    edges: dict[str, dict[str, str]] = {unit(m): {} for m in mods}
    for mod, path in mods.items():
        for target, line in imports(path):
            if target not in mods or target == package:  # the package's own __init__ imports lazily (by name)
                continue
            a, b = unit(mod), unit(target)
            if a != b:
                edges[a].setdefault(b, f"{path.relative_to(ROOT)}:{line}")
    return edges


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], edges: dict[str, dict[str, str]]) -> str:
    inside = set(component)
    return "; ".join(f"{a} -> {b} ({where})" for a in component for b, where in sorted(edges[a].items()) if b in inside)


def subpackage(module: str) -> str:
    """sae_core.store.db -> sae_core.store; sae_core.cache -> sae_core.cache."""
    return ".".join(module.split(".")[:2])


def test_the_walker_sees_every_kind_of_import(tmp_path):
    """The checks below can only pass vacuously if the walker misses imports: check it on known files."""
    found = {t for t, _ in imports(ROOT / "sae_core" / "explain" / "stage.py")}
    assert {"sae_core.store.db", "sae_core.explain.embed", "torch", "sae_core.config"} <= found  # relative, nested, function-level
    assert "sae_core.store" not in found  # `from ..store import db` imports db
    assert "sae_core.store" in graph("sae_core", subpackage)["sae_core.explain"]
    assert cycles({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("level", ["module", "subpackage"])
@pytest.mark.parametrize("package", ["sae_core", "app", "saescope"])
def test_no_import_circles(package, level):
    edges = graph(package, subpackage if level == "subpackage" else lambda m: m)
    found = cycles(edges)
    assert not found, "import circles:\n" + "\n".join(describe(c, edges) for c in found)


FORBIDDEN = {
    "sae_core": ("typer", "rich", "app", "saescope"),  # a library: no command line, no console, no web app
    "app": ("saescope",),  # the entry points sit on top; nothing imports them
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_the_layers_above(package):
    bad = {
        f"{path.relative_to(ROOT)}:{line} imports {target.split('.')[0]}"
        for path in modules(package).values()
        for target, line in imports(path)
        if target.split(".")[0] in FORBIDDEN[package]
    }
    assert not bad, "\n".join(sorted(bad))
