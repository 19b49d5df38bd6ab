"""Imports flow one way (DESIGN.md, "Layers"): the protocol core and the HTTP/1.1 wire import
nothing else of the gateway, the layers above them only what is below, and no two modules
import each other, directly or round a circle. Imports under ``TYPE_CHECKING`` count too:
a type is a dependency."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[3] / "gateway"

#: What each part of the gateway may import of the rest (besides itself).
ALLOWED: dict[str, set[str]] = {
    "matrix": set(),
    "http1": set(),
    "errors": set(),
    "store": set(),
    "logging": set(),
    "metrics": set(),
    "http": {"errors", "logging", "matrix"},
    "federation": {"errors", "http", "matrix", "store"},
    "homeserver": {"errors", "http", "http1", "matrix", "metrics"},
    "notary": {"errors", "matrix", "store"},
    "policy": {"errors", "matrix", "store"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in GATEWAY.rglob("*.py"):
        parts = ("gateway", *path.relative_to(GATEWAY).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """Module -> the gateway modules it imports."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*kept, base] if base else kept)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            edges[name].update(t for t in targets if t in known and t != name)
    return edges


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "gateway"


def test_each_layer_imports_only_what_lies_below_it() -> None:
    wrong = sorted(
        (a, b)
        for a, targets in imports().items()
        for b in targets
        if part(a) in ALLOWED and part(b) != part(a) and part(b) not in ALLOWED[part(a)]
    )
    assert wrong == []


def test_no_import_circles() -> None:
    edges = imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(modules()):
        if module not in index:
            visit(module)
    assert circles == []


def test_the_check_sees_imports() -> None:
    # The analysis itself: known edges are found (relative and absolute, in functions too).
    edges = imports()
    assert "gateway.http1.framing" in edges["gateway.http1.server"]
    assert "gateway.http1.client" in edges["gateway.homeserver.forward"]
    assert "gateway.app" in edges["gateway.workers"]
