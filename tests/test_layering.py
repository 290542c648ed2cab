"""The package's import graph follows the layering of docs/architecture.md §2.

Imports are read from the source with ``ast`` — those inside functions included, since a
function-level import hides a dependency without removing it.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gem_jax"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()

# What users call (commands and the gem_jax.load facade); they may know every stage and each other.
# The viewer package is an application on top of the avatar (it exports and serves it).
ENTRY_POINTS = {"gem_jax", "gem_jax.train", "gem_jax.reenact", "gem_jax.export", "gem_jax.avatar", "gem_jax.report"}
ENTRY_POINTS |= {name for name in MODULES if name.startswith("gem_jax.viewer")}


def _imports(name: str) -> set[str]:
    """gem_jax modules that module ``name`` imports (a package import counts as its __init__)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_the_graph_is_read():
    assert "gem_jax.render.rasterize" in GRAPH["gem_jax.render"]
    assert "gem_jax.loop" in GRAPH["gem_jax.teacher.train"]


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("folder", ["render", "head"])
def test_leaf_libraries_import_only_types(folder):
    """render/ and head/ are leaf libraries: no other gem_jax folder or top-level module but the
    types and the error types."""
    bad = {(m, i) for m in GRAPH if _folder(m) == folder for i in GRAPH[m]
           if _folder(i) != folder and i not in ("gem_jax.types", "gem_jax.errors")}
    assert not bad, sorted(bad)


@pytest.mark.parametrize("folder", ["eigen", "regress"])
def test_the_distilled_avatar_never_imports_the_teacher(folder):
    bad = {(m, i) for m in GRAPH if _folder(m) == folder for i in GRAPH[m] if _folder(i) == "teacher"}
    assert not bad, sorted(bad)


def test_no_stage_imports_an_entry_point():
    bad = {(m, i) for m in GRAPH if m not in ENTRY_POINTS for i in GRAPH[m] if i in ENTRY_POINTS}
    assert not bad, sorted(bad)
