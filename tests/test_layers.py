"""The layering of DESIGN.md, enforced: every module's imports (read with `ast`, so an import
inside a function counts too) go down the layers or stay inside the module's own package; the
packages of layers 1 and 2 are siblings that stay independent of each other; no two files import
each other, directly or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ownlm"

# top-level module or package -> layer
LAYERS = {
    "errors": 0, "fsutil": 0, "progress": 0, "paths": 0,
    "store": 1, "model": 1, "text": 1,
    "formats": 2, "engine": 2,
    "loading": 3, "manage": 3, "export": 3, "inspect": 3, "repacked": 3, "housekeeping": 3,
    "server": 4, "tune": 4, "evaluate": 4, "plots": 4,
    "cli": 5, "__init__": 5,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ownlm modules a file imports (`from . import x` resolved to the module x when it is one)."""
    me = _module(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("ownlm"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ownlm"))
    return found - {_module(path)}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {m: _imports(p, _modules()) for m, p in _modules().items()}


def test_every_module_has_a_layer():
    assert {_top(m) for m in GRAPH} <= set(LAYERS), set(map(_top, GRAPH)) - set(LAYERS)


def test_imports_go_down_the_layers():
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            a, b = _top(module), _top(target)
            if a == b:
                continue
            # below, or (from layer 3 up, where the table puts single modules side by side) beside
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and LAYERS[a] <= 2):
                wrong.append(f"{module} (layer {LAYERS[a]}) imports {target} (layer {LAYERS[b]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Depth-first search for a back edge; reports the circle it closes."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (circle := visit(t)):
                return circle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state and (circle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(circle))


def test_the_checker_sees_what_it_must():
    """Relative imports resolved, `from . import x` read as the module x."""
    assert {"ownlm.engine.cpu_step", "ownlm.engine.graphs", "ownlm.engine.kv_cache"} <= GRAPH["ownlm.engine.steppers"]
    assert "ownlm.model.kernels" in GRAPH["ownlm.model.ops"]
