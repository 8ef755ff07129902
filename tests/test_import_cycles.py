"""No import cycle in flopwise, between packages or between modules, counting every import: those inside
functions and those under ``if TYPE_CHECKING:`` (a cycle that only type checkers follow is still a cycle a
reader has to untangle).

Each package (``flopwise/train/``) and each top-level module (``flopwise/config.py``) is one node of the
package graph; each module (``flopwise.train.trainer``) is one node of the module graph.  An edge is an
``import`` of another node anywhere in a file."""

from __future__ import annotations

import ast
from pathlib import Path

import flopwise

ROOT = Path(flopwise.__file__).parent


def module_name(path: Path) -> str:
    """``flopwise/train/trainer.py`` -> ``flopwise.train.trainer``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imported_modules(tree: ast.AST, package: str = "flopwise") -> set[str]:
    """The flopwise modules ``tree`` (a module of ``package``) imports anywhere (``from a.b import c`` imports
    module ``a.b.c`` where there is one, else ``a.b``; ``from .c import d`` is ``package.c.d``)."""
    found: set[str] = set()

    def resolved(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        return ".".join(parts) or None

    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            anchor = package.split(".")  # a relative import: one dot is the package, each more dot one level up
            base = node.module if node.level == 0 else ".".join(anchor[:len(anchor) + 1 - node.level] + [node.module])
            names = [f"{base}.{alias.name}" for alias in node.names]
        found |= {module for name in names if name.startswith("flopwise.") and (module := resolved(name))}
    return found


def module_graph() -> dict[str, set[str]]:
    return {name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), package_name(name, path)) - {name}
            for name, path in MODULES.items()}


def package_name(module: str, path: Path) -> str:
    """The package a module's relative imports start from: the module itself for a package's ``__init__.py``."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def package_of(module: str) -> str:
    """``flopwise.train.trainer`` -> ``train``; ``flopwise.config`` -> ``config``; ``flopwise`` -> ``flopwise``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        source = package_of(module)
        graph.setdefault(source, set()).update(package_of(t) for t in targets if package_of(t) != source)
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


def test_imports_in_functions_and_under_type_checking_are_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flopwise.config\n"
                     "def f():\n    from flopwise.train import trainer\n")
    assert imported_modules(tree) == {"flopwise.config", "flopwise.train.trainer"}


def test_relative_imports_are_edges():
    tree = ast.parse("from .config import ModelConfig\nfrom ..errors import FlopwiseError\n")
    assert imported_modules(tree, "flopwise.model") == {"flopwise.model.config", "flopwise.errors"}


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_modules():
    graph = module_graph()
    for name in graph:  # a package's __init__ that imports its own modules is their index, not a dependency
        graph[name] = {t for t in graph[name] if not t.startswith(f"{name}.")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle or [])
