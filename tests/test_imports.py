"""The package layering, read from the source with `ast` (every import, including those inside functions):
no import cycle between refcal's modules, and imports only go down the layers
train -> data_recipes -> calibration."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("calibration", "data_recipes", "train")  # lowest layer first
LAYER = {package: rank for rank, package in enumerate(PACKAGES)}


def module_files() -> dict[str, Path]:
    """{"refcal.train.run": path, ...} for every module of the three packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(("refcal", *parts))] = path
    return files


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The refcal modules `path` imports; `from refcal.x import y` counts y when y is a module, else x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import refcal.train.x.y` names a module or its package
                name = name.rpartition(".")[0]
            if name and name.startswith("refcal."):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imported_modules(path, set(files)) - {module} for module, path in files.items()}


def package(module: str) -> str:
    return module.split(".")[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "refcal.train.stages.training" in graph["refcal.train.run"]  # run_stages imports the stages lazily
    assert "refcal.calibration.judges.phrases" in graph["refcal.calibration.judges.registry"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if LAYER[package(target)] > LAYER[package(module)]
    ]
    assert not upward, (
        "imports from a lower layer into a higher one (train -> data_recipes -> calibration):\n" + "\n".join(upward)
    )


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
