"""The package's import graph has no cycles: every import counts, deferred (inside functions) and
TYPE_CHECKING ones included, so a cycle cannot hide behind a late import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """zoospectra.* module name -> source file, from pyproject's package-dir mapping."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules: dict[str, Path] = {}
    for package, folder in cfg["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            modules[".".join((package, *rel))] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `module` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS with colours)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_graph_finder_sees_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_deferred_imports_count(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .other import x\n")
    assert imports_of("pkg.m", src, {"pkg.m", "pkg.other"}) == {"pkg.other"}


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40, sorted(graph)  # the mapping found the whole package
    assert "zoospectra.run.execute" in graph["zoospectra.api"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("layer, forbidden", [
    ("zoospectra.spectral", ("zoospectra.run", "zoospectra.io", "zoospectra.study", "zoospectra.cli")),
    ("zoospectra.adapters", ("zoospectra.run", "zoospectra.study", "zoospectra.cli", "zoospectra.spectral")),
    ("zoospectra.io", ("zoospectra.run", "zoospectra.study", "zoospectra.cli", "zoospectra.spectral")),
])
def test_layers_import_only_downwards(layer: str, forbidden: tuple[str, ...]) -> None:
    """The math knows nothing about runs or Ray; loaders know nothing about the math."""
    graph = import_graph()
    bad = {(m, t) for m, deps in graph.items() if m.startswith(layer)
           for t in deps if t.startswith(forbidden)}
    assert not bad, sorted(bad)
