"""The package's import graph, read from the source: no cycles between its packages and modules, and no
import from a layer above (docs/architecture.md, "Layers"; /work/shared/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "madistill"

# The layers, lowest first. A unit (a subpackage or a top-level module of madistill) imports from its own layer
# and those below it, never from one above; within a layer the imports must not form a cycle. ``config`` sits
# above ``envs`` and ``runtime`` because its validation resolves the env's backend.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version", "seeds", "names", "interrupts"),
    ("envs",),
    ("runtime", "config"),
    ("normalize", "policies", "ppo_losses", "sb3_adapter"),
    ("transforms", "rollout", "bonus", "tb", "branching"),
    ("common",),
    ("evaluate", "teacher"),
    ("attacks",),
    ("explain",),
    ("distill", "cascade"),
    ("finetune", "repair", "selection"),
    ("stages", "api", "cli", "sweeps", "__main__", "__init__"),
)


def _unit(package: Path, parts: list[str]) -> str:
    """The unit a module path inside ``package`` belongs to: its subpackage or top-level module, or
    ``__init__`` (the package root, also for a name the root defines)."""
    if parts and ((package / parts[0]).is_dir() or (package / parts[0]).with_suffix(".py").exists()):
        return parts[0]
    return "__init__"


def import_graph(package: Path) -> dict[str, dict[str, set[str]]]:
    """``{unit: {imported unit: {files importing it}}}`` of every ``.py`` file under ``package`` (function-level
    imports included: they are dependencies too, only later)."""
    name = package.name
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("").parts
        here = [p for p in rel if p != "__init__"]
        src = _unit(package, here)
        edges = graph.setdefault(src, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[list[str]] = []
            if isinstance(node, ast.Import):
                targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == name]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importing module's package
                    pkg = here if rel[-1] == "__init__" else here[:-1]
                    mod = pkg[: len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
                elif node.module and node.module.split(".")[0] == name:
                    mod = node.module.split(".")[1:]
                else:
                    continue
                # ``from madistill import api`` imports the submodule api, not the package root
                targets = [mod + [a.name] for a in node.names] if not mod else [mod]
            for target in targets:
                dst = _unit(package, target)
                if dst != src:
                    edges.setdefault(dst, set()).add(str(path.relative_to(package)))
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The import cycles of ``graph``, one path ``a -> ... -> a`` per strongly connected set of units."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, dict[str, set[str]]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """Every import of a unit from a layer above its own, as ``file: unit (layer i) -> unit (layer j)``."""
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    return [f"{f}: {src} (layer {level[src]}) imports {dst} (layer {level[dst]})"
            for src, edges in sorted(graph.items()) for dst, files in sorted(edges.items())
            if level[dst] > level[src] for f in sorted(files)]


def test_every_package_and_module_has_a_layer():
    placed = {unit for layer in LAYERS for unit in layer}
    assert set(import_graph(PACKAGE)) - placed == set(), "add the new unit to LAYERS in tests/test_layers.py"


def test_the_package_import_graph_has_no_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_unit_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph(PACKAGE), LAYERS) == []


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "madistill"
    (pkg / "common").mkdir(parents=True)
    (pkg / "attacks").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "common" / "__init__.py").write_text("")
    (pkg / "common" / "bootstrap.py").write_text("def f():\n    from madistill.attacks.methods import Attack\n")
    (pkg / "attacks" / "__init__.py").write_text("from . import methods\n")
    (pkg / "attacks" / "methods.py").write_text("from ..common import bootstrap\nfrom madistill import errors\n")
    (pkg / "errors.py").write_text("import madistill\n")
    graph = import_graph(pkg)
    assert {k: set(v) for k, v in graph.items()} == {
        "__init__": set(), "attacks": {"common", "errors"}, "common": {"attacks"}, "errors": {"__init__"}}
    assert cycles(graph) == [["attacks", "common", "attacks"]]
    assert upward_imports(graph, LAYERS) == [
        "common/bootstrap.py: common (layer 5) imports attacks (layer 7)",
        "errors.py: errors (layer 0) imports __init__ (layer 11)",
    ]
