"""The layers of labutils, read from the source: no import circle, and no module importing another
module's underscore names (modules of one subpackage, e.g. kernels/ or checks/, may share theirs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "labutils"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module of this package that ``name`` (a module or a name in one) lives in."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module of labutils, imported name or None, line) for every import, also those
    inside functions."""
    path = FILES[module]
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full, None, node.lineno) if _resolve(full) == full else (base, alias.name, node.lineno))
    return [(_resolve(t), name, line) for t, name, line in found if t.startswith("labutils") and _resolve(t)]


GRAPH = {m: {t for t, _, _ in _imports(m) if t != m} for m in FILES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_finder_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_module_takes_another_modules_private_names(module):
    taken = []
    for target, name, line in _imports(module):
        parent = target.rpartition(".")[0]
        same_subpackage = parent != "labutils" and (module == parent or module.startswith(parent + "."))
        if name and name.startswith("_") and not name.startswith("__") and target != module and not same_subpackage:
            taken.append(f"line {line}: {target}.{name}")
    assert not taken, taken


# What the kernels stand on: the quantizers, the packers and the BitLinear they replace.
BELOW_KERNELS = {"labutils.quant", "labutils.packing", "labutils.packfile", "labutils.bitlinear"}


def test_kernels_import_nothing_above_them():
    """The kernels stand on the quantizers, packers and BitLinear, and may use a leaf module
    (one that imports nothing of labutils, e.g. measure); nothing above them."""
    leaves = {m for m, targets in GRAPH.items() if not targets}
    for module in FILES:
        if module.startswith("labutils.kernels"):
            above = {t for t in GRAPH[module] if not t.startswith("labutils.kernels")} - BELOW_KERNELS - leaves
            assert not above, f"{module} imports {above}"


def test_the_command_line_imports_experiments_only_by_name():
    """bench dispatches by module name (importlib), so it imports no experiment at import time."""
    assert GRAPH["labutils.bench"] == {"labutils.runs"}
