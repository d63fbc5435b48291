"""The three layers, read from the source: core `loop` <- adapter `labeling` <- application `loop.app`.

Imports only point down, none is hidden in a string (`importlib`, `__import__`), and the graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("loop", "labeling"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _layer(module: str) -> int:
    if module == "loop.app" or module.startswith("loop.app."):
        return 2
    return 1 if module.split(".")[0] == "labeling" else 0


def test_imports_point_down_only() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for imported in _imports(path):
            if imported.split(".")[0] in ("loop", "labeling") and _layer(imported) > _layer(name):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "imports pointing up a layer:\n" + "\n".join(sorted(wrong))


def test_no_hidden_imports() -> None:
    hidden = [str(p.relative_to(ROOT)) for p in _modules().values()
              if "import_module(" in p.read_text() or "__import__(" in p.read_text()]
    assert not hidden, f"imports hidden in strings: {hidden}"


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
