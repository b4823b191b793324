"""The package's shape: no import cycles between kdpipe modules, and imports only downward in one layer order.

Every import counts, at module level or inside a function (a function-level import is still a dependency: it
runs, and DVC must rerun the stage when it changes); imports under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kdpipe"

# Top to bottom. A module may import from a lower layer, or from its own group (the same prefix); never from a
# higher layer or from another group of its own layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kdpipe.cli",),
    ("kdpipe.stages",),
    ("kdpipe.predict", "kdpipe.verify", "kdpipe.experiments"),
    ("kdpipe.train", "kdpipe.ship", "kdpipe.report"),
    ("kdpipe.run",),
    ("kdpipe.tracking", "kdpipe.paths"),
    ("kdpipe.store",),
    ("kdpipe.store_moves",),
    ("kdpipe.config",),
    ("kdpipe.distill",),
    ("kdpipe.data", "kdpipe.models"),
    ("kdpipe.sections",),
    ("kdpipe.params_file", "kdpipe.files", "kdpipe.metrics", "kdpipe.evidence"),
    ("kdpipe.errors", "kdpipe.env"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The kdpipe modules an AST imports (a name imported from a package that is itself a module counts as that
    module), skipping `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                todo.extend(child.orelse)
                continue
            todo.append(child)
            if isinstance(child, ast.Import):
                found |= {a.name for a in child.names if a.name in modules}
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "kdpipe":
                subs = {f"{child.module}.{a.name}" for a in child.names} & set(modules)
                found |= subs or ({child.module} & set(modules))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        deps = imported(ast.parse(path.read_text(), str(path)), modules)
        # A package's __init__ is imported with any of its modules; it holds only a docstring (checked below).
        graph[name] = {d for d in deps if d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def place(module: str) -> tuple[int, str]:
    """(layer index, group prefix) of a module."""
    for i, layer in enumerate(LAYERS):
        for group in layer:
            if module == group or module.startswith(group + "."):
                return i, group
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py LAYERS: add it there")


def against_layers(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in graph.items():
        if src == "kdpipe":
            continue
        (i, group) = place(src)
        for dst in deps:
            j, other = place(dst)
            if not (j > i or other == group):
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_follow_the_layer_order():
    assert against_layers(import_graph()) == []


def test_checks_can_fail():
    """The two checks on a made-up graph: a circle and an upward import are both found."""
    graph = {"kdpipe.files": {"kdpipe.config"}, "kdpipe.config": {"kdpipe.files"}, "kdpipe.env": set()}
    assert cycles(graph) == [["kdpipe.config", "kdpipe.files"]]
    assert against_layers(graph) == ["kdpipe.files -> kdpipe.config"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kdpipe.config import Config\n"
                     "def f():\n    from kdpipe import files\n")
    assert imported(tree, {"kdpipe.config": Path(), "kdpipe.files": Path()}) == {"kdpipe.files"}


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_inits_hold_only_a_docstring(init: Path):
    """Importing a subpackage costs nothing and runs nothing; its docstring says what the folder owns (except the
    top-level and stages packages, which are named by the README and dvc.yaml)."""
    body = ast.parse(init.read_text()).body
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init
    if init.parent not in (PACKAGE, PACKAGE / "stages"):
        assert body and len(ast.get_docstring(ast.parse(init.read_text())) or "") > 40, init


def test_no_module_over_300_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "flows").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


def test_the_library_never_imports_the_orchestrators():
    """flows/ imports kdpipe, never the reverse; prefect and dvc only in flows/ (DESIGN.md)."""
    bad = []
    for name, path in all_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{name} imports {m}" for m in mods if m.split(".")[0] in ("flows", "prefect", "dvc")]
    assert bad == []
