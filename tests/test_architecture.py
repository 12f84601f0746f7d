"""The layering of DESIGN.md, checked on the source: imports point down only, and no module-level
import cycle exists between the project's modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("regcore", "pipeline", "workflows", "cluster", "cohortreg")
#: what each layer may import from the project (besides itself)
ALLOWED = {"regcore": set(), "cluster": {"regcore"}, "pipeline": {"regcore", "cluster"},
           "workflows": {"pipeline", "regcore", "cluster"}, "cohortreg": set(PACKAGES)}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported at module level (function-level imports are deferred on purpose)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def test_imports_point_down_only():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        layer = name.split(".")[0]
        for dep in _imports(name, path, modules):
            if dep.split(".")[0] not in ALLOWED[layer] | {layer}:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, wrong


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep] if dep in trail else [node, dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
