"""The layers, read from the source: core `loop` <- adapter `labeling` <- application `sortloop`, and inside
the core the stages in loop order: kernel (`loop`'s own modules) < data < scoring < model < learning < review
< sorting < folders.

Imports only point down (a module may import its own layer or stage and those below), none is hidden in a
string (`importlib`, `__import__`), and the graph has no cycle, between modules or between packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("loop", "labeling", "sortloop")  # the three layers, lowest first
STAGES = ("data", "scoring", "model", "learning", "review", "sorting", "folders")  # inside `loop`, after the kernel
MAX_MODULES = 13  # per folder: a folder with more hides its stages


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
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


def _rank(module: str) -> tuple[int, int]:
    """(layer, stage): the layer's index in PACKAGES; inside `loop`, 0 for the kernel, else 1 + the stage's."""
    parts = module.split(".")
    layer = PACKAGES.index(parts[0])
    stage = STAGES.index(parts[1]) + 1 if layer == 0 and len(parts) > 1 and parts[1] in STAGES else 0
    return layer, stage


def _edges() -> list[tuple[str, str]]:
    modules = _modules()
    return [(name, imported) for name, path in modules.items() for imported in _imports(path)
            if imported.split(".")[0] in PACKAGES and imported != name]


def test_imports_point_down_only() -> None:
    wrong = [f"{name} imports {imported}" for name, imported in _edges() if _rank(imported) > _rank(name)]
    assert not wrong, "imports pointing up a layer or stage:\n" + "\n".join(sorted(set(wrong)))


def test_every_stage_is_a_package_and_every_package_is_ranked() -> None:
    subpackages = {p.parent.name for p in (ROOT / "loop").glob("*/__init__.py")}
    assert subpackages == set(STAGES), f"loop's sub-packages {sorted(subpackages)} differ from STAGES {STAGES}"
    for package in (*PACKAGES, *(f"loop/{s}" for s in STAGES)):
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) >= 2, f"{package}/__init__.py must say what it does and may import"


def test_no_folder_hides_its_stages() -> None:
    crowded = {}
    for package in PACKAGES:
        for folder in [ROOT / package, *(p.parent for p in (ROOT / package).glob("*/__init__.py"))]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > MAX_MODULES:
                crowded[str(folder.relative_to(ROOT))] = len(modules)
    assert not crowded, f"folders with more than {MAX_MODULES} modules: {crowded}"


def test_no_hidden_imports() -> None:
    hidden = [str(p.relative_to(ROOT)) for p in _modules().values()
              if "import_module(" in p.read_text() or "__import__(" in p.read_text()]
    assert not hidden, f"imports hidden in strings: {hidden}"


def _first_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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
            return cycle
    return None


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, imported in _edges():
        # `from loop.data import manifest` names the package and the module: the module is the edge
        if imported in modules and not name.startswith(imported + ".") and not imported.startswith(name + "."):
            graph[name].add(imported)
    cycle = _first_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycles_between_packages() -> None:
    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if parts[0] == "loop" and len(parts) > 1 and parts[1] in STAGES else parts[0]

    graph: dict[str, set[str]] = {}
    for name, imported in _edges():
        src, dst = package(name), package(imported)
        graph.setdefault(src, set())
        graph.setdefault(dst, set())
        if src != dst:
            graph[src].add(dst)
    cycle = _first_cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])
