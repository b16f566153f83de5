"""The package's modules form layers: no import cycle, not even through a function-local import.

Read from the source with ``ast`` (nothing is imported): an edge a -> b for every
``import`` / ``from ... import`` of a dist_lora module b in module a, at the top or inside a
function, except under ``if TYPE_CHECKING:`` (type hints only). Importing ``p.q`` also imports
the package ``p``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dist_lora"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    return {
        id(node)
        for block in tree.body
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.dump(block.test)
        for node in ast.walk(block)
    }


def _imported(module: str, is_package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + is_package]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hints = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in hints:
                continue
            for target in _imported(name, path.name == "__init__.py", node):
                parts = target.split(".")
                for end in range(1, len(parts) + 1):  # a module imports its packages' __init__ too
                    dep = ".".join(parts[:end])
                    if dep in paths and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str]:
    """A path start -> ... -> start through ``graph``, or [] if there is none."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in sorted(graph[node]):
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return []


def test_no_import_cycle_in_the_package() -> None:
    graph = _import_graph()
    assert "dist_lora.model" in graph and graph["dist_lora.model"]  # the graph was read
    cycles = [" -> ".join(c) for c in (_cycle_from(graph, name) for name in sorted(graph)) if c]
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:10])
