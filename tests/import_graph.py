"""The project's own import graph, read statically from the source (imports inside functions included).

Used by test_architecture.py: no import cycles, no project imports hidden in functions, and every file
a DVC stage executes covered by that stage's deps.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bertshrink", "tasks", "flows", "tracking")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the project's packages."""
    return {module_name(path, root): path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (``a.b.func`` -> ``a.b``), or None for other packages."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function?) for each import in ``module``."""
    path = modules[module]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                targets = [f"{base}.{alias.name}" for alias in child.names] + [base]
            else:
                visit(child, inside)
                continue
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != module:
                    found.append((resolved, child.lineno, inside))
                    break

    visit(ast.parse(path.read_text()), False)
    return found


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in it), plus the packages it sits in
    (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``)."""
    graph = {}
    for module in modules:
        targets = {target for target, _, _ in imports_of(module, modules)}
        parents = {module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)}
        graph[module] = targets | {p for p in parents if p in modules}
    return graph


def executed_files(entry: str, modules: dict[str, Path]) -> set[Path]:
    """Every project file that running ``entry`` may execute: its transitive imports (and their packages)."""
    graph, seen, todo = edges(modules), set(), [entry]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(graph.get(current, ()))
    return {modules[m] for m in seen}


def cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """Groups of modules that import each other in a circle (strongly connected components > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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

    for v in graph:
        if v not in index:
            connect(v)
    return found
