"""No import cycles in dualdiff, and the layers point one way.

The graph is read statically with ``ast`` from every ``import`` in every module, at module
level *and* inside functions (a lazy import that closes a cycle is still a cycle: it hides an
ordering bug until the day someone moves it to the top). A package's ``__init__`` re-exporting
its own submodules is not an edge back into them. Without cycles every module imports on its
own whatever was imported before it; one fresh interpreter then imports each module to check
that every import resolves.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dualdiff

ROOT = Path(dualdiff.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The dualdiff module ``name`` refers to (a module, or the module holding an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            target = _resolve(n) if n.startswith("dualdiff") else None
            if target and target != module:
                out.add(target)
    if path.name == "__init__.py":  # re-exports of its own submodules
        out = {t for t in out if not t.startswith(module + ".")}
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports():
    # a check of the checker: known edges are found, at module level and inside functions
    assert "dualdiff.experiments.run" in GRAPH["dualdiff.experiments.lift"]
    assert "dualdiff.diffusion.loss_weights" in GRAPH["dualdiff.analysis.tadiff_plots"]  # a lazy import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_analysis_never_imports_experiments_or_the_cli():
    bad = {m: sorted(t for t in ts if t.startswith(("dualdiff.experiments", "dualdiff.cli")))
           for m, ts in GRAPH.items() if m.startswith("dualdiff.analysis")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


@pytest.mark.parametrize("layer", ["dualdiff.diffusion", "dualdiff.models", "dualdiff.metrics", "dualdiff.ops",
                                   "dualdiff.train", "dualdiff.data", "dualdiff.errors", "dualdiff.config"])
def test_lower_layers_never_import_experiments_or_the_cli(layer):
    bad = {m: sorted(t for t in ts if t.startswith(("dualdiff.experiments", "dualdiff.cli")))
           for m, ts in GRAPH.items() if m == layer or m.startswith(layer + ".")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_every_module_imports(tmp_path):
    code = ("import importlib, sys\n"
            f"names = {sorted(MODULES)!r}\n"
            "bad = []\n"
            "for n in names:\n"
            "    try:\n"
            "        importlib.import_module(n)\n"
            "    except Exception as e:\n"
            "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad))\n"
            "sys.exit(1 if bad else 0)\n")
    # from a neutral folder: `python -c` in the checkout would import its source tree (no built
    # dualdiff._C, no dualdiff.kernels mapping) instead of the installed package
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
