"""The import graph of the project's packages, read from the source with `ast`: no cycle, and the layering
DESIGN.md states (model/ and data/ never import train/; data/ never imports model/).

Every import counts, the ones inside functions too: a lazy import that closes a cycle is still a cycle (it
only moves the failure from import time to the first call), so none is exempt.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

from tests.conftest import REPO

PACKAGES = ("data", "model", "train", "launch")


def _modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: Dict[str, Path]) -> List[str]:
    """The project modules an import statement loads: the one it names, a `from X import name` submodule,
    and the packages above them (their __init__ runs first)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the importing module's package upwards
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [source] + [f"{source}.{alias.name}" for alias in node.names]
    else:
        return []
    out: Set[str] = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # A module's own packages are loaded before it: importing them is no edge back.
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    return sorted(m for m in out if m in known and m not in own)


def import_graph() -> Dict[str, List[str]]:
    """Module -> the project modules it imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    known = _modules()
    graph = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = sorted({m for node in ast.walk(tree) for m in _imported(node, module, is_package, known)})
    return graph


def find_cycle(graph: Dict[str, List[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_what_it_should():
    graph = import_graph()
    # a top-level import, a function-level one, `from package import submodule` and a relative-free package
    assert "train.config" in graph["train.recipe"]
    assert "train.rl" in graph["train.loop"]  # make_algorithm's import inside a function
    assert "train.evaluate" in graph["train.loop"]  # from train import evaluate as evaluation
    assert "train.rl.losses" in graph["train.rl.policy"]  # from train.rl import losses as L
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers():
    """model/ and data/ never import train/ (nor launch/); data/ never imports model/."""
    forbidden = {"data": ("train", "launch", "model"), "model": ("train", "launch")}
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items()
             for target in targets if target.split(".")[0] in forbidden.get(module.split(".")[0], ())]
    assert wrong == []
