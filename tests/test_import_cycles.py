"""No import cycle between flopwise's packages, counting imports inside functions.

Each top-level module (``flopwise/config.py``) and each package (``flopwise/train/``) is one node; an
edge is any ``import`` of another node anywhere in a file, except under ``if TYPE_CHECKING:``, which
never runs."""

from __future__ import annotations

import ast
from pathlib import Path

import flopwise

ROOT = Path(flopwise.__file__).parent


def node_of(module: str) -> str | None:
    """``flopwise.train.trainer`` -> ``train``; ``flopwise.config`` -> ``config``; others -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "flopwise" and len(parts) > 1 else None


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Modules imported by ``tree``, skipping ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        source = relative.parts[0].removesuffix(".py")
        if source in ("__init__", "__main__"):
            continue
        edges = graph.setdefault(source, set())
        for module in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            target = node_of(module)
            if target is not None and target != source and target not in ("__init__", "__main__"):
                if (ROOT / target).is_dir() or (ROOT / f"{target}.py").is_file():
                    edges.add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_type_checking_imports_are_not_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flopwise.x\n"
                     "def f():\n    import flopwise.y\n")
    assert [m for m in _runtime_imports(tree) if m.startswith("flopwise")] == ["flopwise.y"]


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])
