"""corral's imports point down only, and no two modules import each other.

The layer order is written here once, lowest first; a module may import its own layer
and those below it. Imports inside functions count too (deferring an import does not
change which way the dependency points); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Lowest first. A package's name stands for all of its modules.
LAYERS = [
    ["corral.errors", "corral.console"],
    ["corral.comm"],
    ["corral.runtime"],
    ["corral.engines"],
    ["corral.data", "corral.spark"],  # corral.spark: DataFrames in (feeds) and out (UDFs)
    ["corral.ps"],
    ["corral.federated"],  # partitions, aggregation, secure aggregation, DP accounting
    ["corral.strategies"],
    ["corral.spec"],
    ["corral.train"],
    # corral.ml: a Spark ML Estimator; corral.classic: the xgboost, lightgbm, sklearn kinds
    ["corral.entrypoints", "corral.jobs", "corral.ml", "corral.classic"],
    ["corral.federation"],  # the aggregator and the clients of real-client federated jobs
    ["corral.search"],  # search spaces and the driver of a search's trials
    ["corral.service"],
    ["corral.cli"],
    ["corral", "corral.__main__"],  # the facade, which re-exports from every layer
]


def _layer(module: str) -> int:
    best, depth = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            matches = module == name or module.startswith(name + ".")
            if matches and name.count(".") > depth:
                best, depth = index, name.count(".")
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """The corral modules `path` imports (a package's ``__init__`` for ``from pkg import x``
    unless ``x`` is a submodule)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("corral"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("corral"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    is_module = (SRC / sub.replace(".", "/")).with_suffix(".py").exists() or (
                        SRC / sub.replace(".", "/") / "__init__.py"
                    ).exists()
                    found.add(sub if is_module else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p, _module_name(p))
        for p in sorted((SRC / "corral").rglob("*.py"))
        if "migrations" not in p.parts
    }


def test_imports_point_down():
    upward = [
        f"{importer} (layer {_layer(importer)}) imports {imported} (layer {_layer(imported)})"
        for importer, targets in _graph().items()
        for imported in sorted(targets)
        if _layer(imported) > _layer(importer)
    ]
    assert not upward, "imports that point up:\n  " + "\n  ".join(upward)


def test_no_two_modules_import_each_other():
    graph = _graph()
    graph.pop("corral", None)  # the facade imports everything, lazily, and nothing needs it
    for deps in graph.values():
        deps.discard("corral")
    cycles: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


@pytest.mark.parametrize("module", ["corral.strategies.base", "corral.runtime.context"])
def test_the_check_sees_a_real_import(module):
    """A check that found no imports at all would pass vacuously."""
    assert any(t.startswith("corral.") for t in _graph()[module])
