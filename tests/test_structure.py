"""The package's shape: imports point one way (no cycles, imports inside functions included) and the CLI is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import metarun.bench.command
import metarun.trainer

PACKAGE = Path(metarun.trainer.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The package module an imported name lives in (``metarun.a.b.func`` -> ``metarun.a.b``)."""
    while name and name not in MODULES:
        if (PACKAGE.parent / name.replace(".", "/")).is_dir():  # a namespace sub-package: importing it runs no package code
            return None
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Every package module ``module`` imports, at the top or inside a function."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {m for n in names if n.startswith("metarun") and (m := resolve(n)) and m != module}
    return found


GRAPH = {m: imports(m) for m in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, [*path, n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "metarun.errors", {*GRAPH["metarun.errors"], "metarun.cli"})
    assert find_cycle() is not None


def test_nothing_imports_the_cli_but_the_entry_point():
    importers = sorted(m for m, deps in GRAPH.items() if "metarun.cli" in deps)
    assert importers == ["metarun.__main__"]


def test_no_module_below_the_cli_reads_hydras_global_state():
    readers = sorted(m for m in MODULES if "HydraConfig" in MODULES[m].read_text() and m != "metarun.cli")
    assert readers == []


def test_the_bench_times_the_trainers_own_step():
    assert metarun.bench.command.train_step is metarun.trainer.train_step
    assert metarun.bench.command.build_step is metarun.trainer.build_step
