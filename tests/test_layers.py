"""The layers hold: algorithms never import a backend, backends never import a loss (or a
network or a policy), roles and replay import nothing above them, and no module of the
package imports itself back through others. Read from the source (every import, also
inside functions; ``if TYPE_CHECKING:`` blocks are for the type checker only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qfleet"

# What each layer may import from qfleet (its own package always).
ALLOWED = {
    "qfleet.replay": {"qfleet.config", "qfleet.errors"},
    # a learning-rate schedule is a pure function of the config, level with it
    "qfleet.schedules": {"qfleet.config"},
    "qfleet.roles": {"qfleet.config", "qfleet.errors", "qfleet.replay", "qfleet.envs",
                     "qfleet.nets", "qfleet.losses", "qfleet.policies", "qfleet.schedules"},
}
FORBIDDEN = {
    "qfleet.algos": {"qfleet.runtime", "qfleet.experiment", "qfleet.cli"},
    "qfleet.runtime": {"qfleet.losses", "qfleet.nets", "qfleet.policies", "qfleet.experiment",
                       "qfleet.cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """The qfleet modules ``path`` imports at run time."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qfleet"))
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("qfleet"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")
                             ).with_suffix(".py").exists())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str, layers: dict[str, set[str]]) -> str | None:
    return next((layer for layer in layers if module == layer or
                 module.startswith(layer + ".")), None)


def _in(module: str, targets: set[str]) -> bool:
    return any(module == t or module.startswith(t + ".") for t in targets)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layer_rules(module: str) -> None:
    if (layer := _layer(module, ALLOWED)) is not None:
        outside = {m for m in GRAPH[module] if not _in(m, {layer, *ALLOWED[layer]})}
        assert not outside, f"{module} imports from above its layer: {sorted(outside)}"
    if (layer := _layer(module, FORBIDDEN)) is not None:
        bad = {m for m in GRAPH[module] if _in(m, FORBIDDEN[layer])}
        assert not bad, f"{module} must not import {sorted(bad)}"


def _resolve(target: str) -> str | None:
    """The module of GRAPH an import names (``qfleet.replay.Batch`` -> ``qfleet.replay``)."""
    while target and target not in GRAPH:
        target = target.rpartition(".")[0]
    return target or None


def test_no_import_cycle() -> None:
    edges = {m: {t for i in deps if (t := _resolve(i)) and t != m and
                 not m.startswith(t + ".")}  # a package's own __init__ is not a cycle
             for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])


def test_the_rules_see_a_planted_violation(tmp_path: Path) -> None:
    planted = tmp_path / "x.py"
    planted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from qfleet.nets import X\n"
                       "def f():\n    from qfleet.losses import dqn_loss\n")
    assert imports_of(planted) == {"qfleet.losses"}
