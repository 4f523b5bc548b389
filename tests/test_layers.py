"""The imports of ``src`` point one way: no cycle, and no layer imports a layer above it.

Every import statement counts, at module level or inside a function (and under
``TYPE_CHECKING``). Importing ``src.a.b`` from outside the package ``src.a`` imports
``src.a`` too (its ``__init__`` runs first), so that is an edge as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Lowest first. A name covers its submodules ("src" alone covers only src/__init__.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("src", "src.errors", "src.local_paths", "src.compat", "src.strategies", "src.checkpoint_io"),
    ("src.datamodules",),  # data preparation, the tokenizer loader included
    ("src.generation",),
    ("src.loggers", "src.model_card", "src.diagnose"),  # what callbacks log, export, read back
    ("src.modules",),
    ("src.callbacks",),
    ("src.resume", "src.cli"),
    ("src.preview", "src.tune"),  # commands built on the CLI
)

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first import}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name of every module under ``root/src`` (a package by its ``__init__.py``)."""
    names = {}
    for path in sorted((root / "src").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of ``modules``."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The ``src`` modules an import statement names (a package or a submodule of it)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importing module's package upwards
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
        return []
    return [k for k in (_known(n, modules) for n in names if n.split(".")[0] == "src") if k]


def import_graph(root: Path) -> Graph:
    modules = module_names(root)
    graph: Graph = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for target in _imported(node, module, is_package, modules):
                parts = target.split(".")
                packages = [".".join(parts[:n]) for n in range(1, len(parts))]
                for name in [*packages, target]:  # a package's __init__ runs before its module
                    inside = module == name or module.startswith(name + ".")
                    if name in modules and not inside:
                        edges.setdefault(name, node.lineno)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, {})):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def layer_of(module: str) -> int | None:
    for index, names in enumerate(LAYERS):
        if any(module == n or (n != "src" and module.startswith(n + ".")) for n in names):
            return index
    return None


def upward_imports(graph: Graph) -> list[str]:
    """Every import of a module from a higher layer, in words."""
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            low, high = layer_of(module), layer_of(target)
            if low is not None and high is not None and high > low:
                found.append(f"{module} (layer {low}) imports {target} (layer {high}), line {line}")
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in module_names(ROOT) if layer_of(m) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_layer_imports_a_higher_one():
    upward = upward_imports(import_graph(ROOT))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import_inside_a_function(tmp_path):
    files = {
        "src/__init__.py": "",
        "src/errors.py": "def explain():\n    from src.cli import main\n",
        "src/cli.py": "import src.errors\n",
        "src/datamodules/__init__.py": "from src.datamodules.base import Base\n",
        "src/datamodules/base.py": "from .records import Row\n",
        "src/datamodules/records.py": "Row = dict\n",
        "src/generation.py": "from src.datamodules.records import Row\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["src.generation"] == {"src.datamodules": 1, "src.datamodules.records": 1}
    assert graph["src.datamodules.base"] == {"src.datamodules.records": 1}
    assert find_cycle(graph) == ["src.cli", "src.errors", "src.cli"]
    assert upward_imports(graph) == ["src.errors (layer 0) imports src.cli (layer 6), line 2"]
