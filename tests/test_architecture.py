"""Architecture rules, checked on the source: no import cycles, no foreign `_private` imports, lean kernels.

The scan parses (with `ast`, without importing anything) every .py file of the package `hrfast` (hrfast/) and of
`hrfast.kernels` (kernels/, installed under that name by setup.py's package_dir), and collects every import
statement, including those inside functions and methods: a lazy import still runs, so it still couples two
modules and can still close a cycle at run time. Imports under ``if TYPE_CHECKING:`` are skipped: they never
run. Dynamic imports (`importlib.import_module`) are not statements and are not seen.

An import points at the most specific hrfast module it names: ``from hrfast.ops import fuse`` points at
`hrfast.ops.fuse` when `fuse` is a submodule that hrfast/ops/__init__.py does not rebind, and at `hrfast.ops`
when the package defines the name itself (Python's own order: the package attribute wins). The parent packages
that Python initialises on the way (`hrfast`, `hrfast.ops`) are not counted as imported.
"""
from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"hrfast": REPO / "hrfast", "hrfast.kernels": REPO / "kernels"}
KERNELS = "hrfast.kernels"
KERNELS_MAY_IMPORT = ("hrfast.plan",)  # besides hrfast.kernels itself
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class Import(NamedTuple):
    """One imported thing: `base` is the module named, `name` the imported attribute (None for `import x`)."""

    src: str
    where: str  # file:line
    base: str
    name: Optional[str]

    @property
    def dotted(self) -> str:
        return self.base if self.name is None else f"{self.base}.{self.name}"


# ------------------------------------------------------------------------------------------------ the scan


@functools.lru_cache(maxsize=None)
def modules() -> Dict[str, Path]:
    """Every module of hrfast and hrfast.kernels by dotted name; a package is named by its __init__.py."""
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def is_package(name: str) -> bool:
    return name in modules() and modules()[name].name == "__init__.py"


@functools.lru_cache(maxsize=None)
def parse(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _walk(node: ast.AST, into_defs: bool = True) -> Iterator[ast.AST]:
    """Every node below `node` but the bodies of ``if TYPE_CHECKING:`` (never run; their `else` does); with
    into_defs=False, not into functions and classes either (what runs at import time)."""
    for child in ast.iter_child_nodes(node):
        runs = child.orelse if isinstance(child, ast.If) and _is_type_checking(child.test) else [child]
        for sub in runs:
            yield sub
            if into_defs or not isinstance(sub, DEFS):
                yield from _walk(sub, into_defs)


def _from_base(src: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement names, relative levels resolved."""
    if not node.level:
        return node.module
    package = src if is_package(src) else src.rpartition(".")[0]
    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(src: str) -> List[Import]:
    """The hrfast imports of one module, in source order."""
    rel = modules()[src].relative_to(REPO)
    found = []
    for node in _walk(parse(src)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(src, where, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(src, node)
            found += [Import(src, where, base, alias.name) for alias in node.names]
    return [imp for imp in found if imp.base.split(".")[0] == "hrfast"]


@functools.lru_cache(maxsize=None)
def all_imports() -> List[Import]:
    return [imp for src in sorted(modules()) for imp in imports_of(src)]


@functools.lru_cache(maxsize=None)
def defined_names(package: str) -> Set[str]:
    """Names a package's __init__ binds at top level, except submodules it imports as themselves
    (``from . import ops`` leaves `ops` the submodule; ``from .fuse import fuse`` rebinds `fuse`)."""
    names = set()
    for node in _walk(parse(package), into_defs=False):
        if isinstance(node, DEFS):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and _from_base(package, node) != package:
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def target(imp: Import) -> Optional[str]:
    """The most specific hrfast module an import points at; None for one that is no scanned .py file (the
    compiled extension hrfast._C, or a module that does not exist: the import test reports that)."""
    if imp.name is not None and is_package(imp.base) and imp.name not in defined_names(imp.base):
        return imp.dotted if imp.dotted in modules() else None  # a submodule
    return imp.base if imp.base in modules() else None


def graph() -> Dict[str, Dict[str, str]]:
    """src -> {dst: file:line of the first import of dst in src}; self-imports are not edges."""
    edges: Dict[str, Dict[str, str]] = {src: {} for src in modules()}
    for imp in all_imports():
        dst = target(imp)
        if dst and dst != imp.src:
            edges[imp.src].setdefault(dst, imp.where)
    return edges


# ------------------------------------------------------------------------------------------------ cycles


def reachable(edges: Dict[str, Dict[str, str]], start: str) -> Set[str]:
    seen: Set[str] = set()
    todo = [start]
    while todo:
        for child in edges[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def strongly_connected(edges: Dict[str, Dict[str, str]]) -> List[List[str]]:
    """The components of two or more modules that all reach each other, sorted (mutual reachability from every
    module: quadratic, and simpler than Tarjan's algorithm for a graph of some fifty modules)."""
    reach = {node: reachable(edges, node) for node in edges}
    components = {tuple(sorted(other for other in reach[node] if node in reach[other])) for node in edges}
    return sorted(list(c) for c in components if len(c) > 1)


def example_cycle(edges: Dict[str, Dict[str, str]], component: List[str]) -> List[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start, members = component[0], set(component)
    came_from = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == start:
                    path = [node]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if child in members and child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def describe_cycles(edges: Dict[str, Dict[str, str]], components: List[List[str]]) -> str:
    lines = []
    for component in components:
        lines.append(f"import cycle among {len(component)} modules: {', '.join(component)}")
        path = example_cycle(edges, component)
        lines += [f"    {a} -> {b}   ({edges[a][b]})" for a, b in zip(path, path[1:])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ rules


def _is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def owners(imp: Import) -> List[str]:
    """The packages owning each private component of what is imported: a private module belongs to the package
    holding it, a private name to the package of the module defining it."""
    parts = imp.dotted.split(".")
    found = []
    for i, part in enumerate(parts[1:], start=1):
        if _is_private(part):
            prefix = ".".join(parts[:i])
            found.append(prefix if is_package(prefix) else prefix.rpartition(".")[0])
    return found


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def private_violations() -> List[str]:
    return [f"{imp.where}: {imp.src} imports {imp.dotted} (private to {owner})"
            for imp in all_imports() for owner in owners(imp) if not inside(imp.src, owner)]


def kernels_violations() -> List[str]:
    found = []
    for imp in all_imports():
        dst = target(imp) or imp.base
        if inside(imp.src, KERNELS) and not (inside(dst, KERNELS) or dst in KERNELS_MAY_IMPORT):
            found.append(f"{imp.where}: {imp.src} imports {imp.dotted} ({dst})")
    return found


# ------------------------------------------------------------------------------------------------ tests


def test_scan_sees_the_package():
    """Guards the rules below against passing vacuously (a moved folder, a broken scan)."""
    names = modules()
    assert {"hrfast", "hrfast.ops", "hrfast.kernels"} <= set(names)
    assert any(inside(name, KERNELS) and name != KERNELS for name in names)
    assert sum(len(dsts) for dsts in graph().values()) > len(names)


def test_cycle_detection_finds_a_planted_cycle():
    edges = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"}, "d": {}}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert example_cycle(edges, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    edges = graph()
    components = strongly_connected(edges)
    assert not components, describe_cycles(edges, components)


def test_no_foreign_private_imports():
    violations = private_violations()
    assert not violations, "private names or modules imported from outside their package:\n" + "\n".join(violations)


def test_kernels_depend_only_on_the_plan():
    violations = kernels_violations()
    assert not violations, (f"{KERNELS} may import from hrfast only {', '.join(KERNELS_MAY_IMPORT)}:\n"
                            + "\n".join(violations))


def test_every_module_imports_in_a_fresh_interpreter():
    """One interpreter imports every scanned module in sorted order: a module that cannot be imported (a cycle
    that bites at import time, a missing dependency) fails here with its traceback. TRITON_INTERPRET=1 lets
    hrfast.kernels import on a machine without a GPU."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code, *sorted(modules())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"importing every hrfast module failed:\n{proc.stderr}", pytrace=False)
