"""The project's layout: the import graph between its own modules (revjax, revtorch,
experiments) has no cycles, experiments/ is grouped by job and imports downwards only, and no
experiment finds its imports by editing ``sys.path``.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` at any level, inside functions too, relative ones resolved against the
module's package. ``from package import name`` is an edge to ``package.name`` where that is
a module, else to ``package``. A package's ``__init__`` is not counted as imported by its
submodules (Python runs it first, but a cycle through it is the package's own business)."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("revjax", "revtorch", "experiments")


def modules() -> dict[str, str]:
    """Every module of ``PACKAGES``: dotted name -> path (a package is its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _imported(module: str, path: str, known) -> set[str]:
    """The project modules ``module`` (at ``path``) imports, anywhere in its body."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()

    def nearest(name: str) -> str | None:  # the module itself, or the package holding it
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [nearest(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [nearest(f"{source}.{a.name}") if f"{source}.{a.name}" in known
                       else nearest(source) for a in node.names]
        else:
            continue
        out.update(t for t in targets if t is not None and t != module)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: _imported(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Each strongly connected group of modules (every module in it imports every other,
    through the others) with one cycle through it, ``[a, b, ..., a]``."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for group in groups:  # a shortest path back to the group's first module
        start = min(group)
        paths, seen = {start: [start]}, {start}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group - seen):
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        out.append((paths[last] + [start], group))
    return out


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [(["a", "b", "c", "a"], {"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_resolves_relative_and_function_level_imports():
    graph = import_graph()
    assert "revjax.core" in graph["revjax"]  # from .core import ... in revjax/__init__.py
    assert "experiments.common" in graph["experiments.bench.cli"]
    # inside a function: the gpu-compile memory cells take the probe's compiler options
    assert "experiments.probes.gpu_compile" in graph["experiments.bench.measure_jax"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    found = [(cycle, group) for cycle, group in cycles(import_graph())
             if any(m.split(".")[0] == package for m in group)]
    assert not found, "import cycles: " + "; ".join(
        f"{' -> '.join(cycle)} (the cycle's group: {', '.join(sorted(group))})"
        for cycle, group in found)


# experiments/: lower groups never import higher ones
LAYERS = ("experiments.common", "experiments.train", "experiments.probes", "experiments.bench")


def _layer(module: str) -> int | None:
    return next((i for i, prefix in enumerate(LAYERS)
                 if module == prefix or module.startswith(prefix + ".")), None)


def test_experiments_import_downwards_only():
    graph = import_graph()
    up = [(m, t) for m, targets in graph.items() if _layer(m) is not None
          for t in targets if _layer(t) is not None and _layer(t) > _layer(m)]
    assert not up, "imports of a higher group: " + ", ".join(f"{m} -> {t}" for m, t in up)
    loose = [m for m in graph if m.startswith("experiments.") and _layer(m) is None]
    assert not loose, f"experiments modules outside the groups {LAYERS}: {loose}"


def test_experiments_import_no_tests():
    for module, path in modules().items():
        if not module.startswith("experiments"):
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("tests", "parity_tests")], (
                module)


SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[.*\]\s*=|\+=|=[^=])")


def test_no_experiment_edits_sys_path():
    """Not in code, nor in code handed to a subprocess: experiments are imported as the
    ``experiments`` package (``python -m experiments.bench`` from the repository root)."""
    hits = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, "experiments")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith((".py", ".sh")):
                path = os.path.join(folder, name)
                for i, line in enumerate(open(path, encoding="utf-8"), 1):
                    if SYS_PATH_EDIT.search(line):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
    assert SYS_PATH_EDIT.search("sys.path.insert(0, HERE)")
    assert SYS_PATH_EDIT.search("code = \"import sys; sys.path.append('x')\"")
    assert not SYS_PATH_EDIT.search("print(sys.path)")
