"""The package's shape: imports go one way, down the flow hooks -> statistics -> spectra -> (views | compression) ->
callbacks, with no cycle, and no module grows past what one reader takes in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_rank"

# Each room may import the rooms of lower levels and its own modules; rooms of one level never import each other.
LEVELS = {
    "targets": 0,  # which modules: selectors, layer kinds, (out, fan_in) views
    "checks": 1,  # argument checks shared by functions and callbacks
    "stats": 2,
    "spectral": 3,
    "compress": 4,
    "views": 4,
    "callbacks": 5,
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``lightning_rank.stats.sums``; packages by their own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts ``a.b`` when ``b`` is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found - {name}


def room(module: str) -> str:
    """``lightning_rank.stats.sums`` -> ``stats``; the package's top-level modules are rooms of their own."""
    return module.split(".")[1] if "." in module else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_room_is_known_and_is_a_package(graph) -> None:
    rooms = {room(name) for name in graph} - {""}
    assert rooms == set(LEVELS)
    for name in rooms:  # a subpackage (setuptools packages only folders with an __init__.py) or a module
        assert (PACKAGE / name / "__init__.py").is_file() or (PACKAGE / f"{name}.py").is_file(), name


def test_imports_only_go_down_the_flow(graph) -> None:
    upward = []
    for module, imported in graph.items():
        if module == "lightning_rank":
            continue  # the public names, from every room
        for target in imported:
            here, there = room(module), room(target)
            if there == "" or (here != there and LEVELS[there] >= LEVELS[here]):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_cycle(graph) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_checker_sees_module_imports_in_every_form(tmp_path) -> None:
    """``import a.b``, ``from a import b`` (b a module) and ``from a.b import name`` all count as importing ``a.b``,
    so an upward import cannot hide behind the form it is written in."""
    known = {"lightning_rank.stats", "lightning_rank.stats.sums", "lightning_rank.spectral.spectrum"}
    source = tmp_path / "probe.py"
    for line in ("import lightning_rank.spectral.spectrum", "from lightning_rank.spectral.spectrum import energy_rank",
                 "def f():\n    from lightning_rank.spectral import spectrum"):
        source.write_text(line + "\n", encoding="utf-8")
        known_here = known | {"lightning_rank.spectral"}
        assert imports("lightning_rank.stats.sums", source, known_here) == {"lightning_rank.spectral.spectrum"}, line


def test_no_module_over_the_line_budget() -> None:
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_the_top_level_holds_public_names_only() -> None:
    """``lightning_rank/__init__.py`` imports and lists names; it defines nothing of its own."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    own = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert own == []
    import lightning_rank

    assert all(not name.startswith("_") for name in lightning_rank.__all__)
    assert all(hasattr(lightning_rank, name) for name in lightning_rank.__all__)
