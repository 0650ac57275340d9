"""The shape of edgecli/ as issue 15 asks for it, read from the source with ``ast`` (nothing is imported).

- no import cycle, counting function-level imports (they only postpone a cycle to run time);
- no stage module imports another stage;
- only edgecli/runtimes/ creates an ``onnxruntime.InferenceSession``;
- every stages/*.py is at most 350 lines, and no function in stages/ is over 80.

"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "edgecli"
MAX_STAGE_LINES = 350
MAX_FUNCTION_LINES = 80


def _module_name(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


@cache
def _tree(name: str) -> ast.Module:
    return ast.parse(_modules()[name].read_text(encoding="utf-8"), str(_modules()[name]))


def _imports(name: str) -> set[str]:
    """The edgecli modules ``name`` imports anywhere in its body, with the packages each one runs first."""
    mods = _modules()
    is_pkg = _modules()[name].name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from edgecli.stages import bench` imports the module edgecli.stages.bench
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import edgecli.x.attr` style leftovers: the module that holds it
                t = t.rpartition(".")[0]
            parts = t.split(".")
            # importing edgecli.a.b runs edgecli/a/__init__.py first -- unless edgecli.a is the importer's own
            # package, which Python has already started initialising before any of its submodules runs
            implied = {".".join(parts[:i]) for i in range(2, len(parts))}
            out |= {t} | {pkg for pkg in implied if not name.startswith(pkg + ".")}
    out.discard(name)
    return {m for m in out if m in mods and m != "edgecli"}


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m) for m in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module, as one cycle through it (A -> B -> ... -> A)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, c) for c in comps]


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle inside ``comp`` through its first module (breadth-first back to it)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def test_the_import_graph_sees_function_level_imports():
    # the walker itself: a function-level import is an edge, and so is the package a submodule runs first
    g = _graph()
    assert "edgecli.runtimes.worker" in g["edgecli.benchworker"]  # imported inside main()
    assert "edgecli.stages" in g["edgecli.stages.bench"]
    assert "edgecli.runtimes" in g["edgecli.stages.bench"]  # edgecli.runtimes.env runs runtimes/__init__ first
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _stage_files() -> list[str]:
    return [m for m in _modules() if m.startswith("edgecli.stages")]


STAGE_MODULES = [m for m in _stage_files() if m != "edgecli.stages"]


@pytest.mark.parametrize("module", [pytest.param(m, id=m.rsplit(".", 1)[-1]) for m in STAGE_MODULES])
def test_no_stage_imports_another_stage(module):
    others = {m for m in _imports(module) if m in STAGE_MODULES and m != module}
    assert not others, f"{module} imports the stage(s) {sorted(others)}; move the shared code to the library"


def _sessions_created(module: str) -> list[int]:
    """Lines where ``module`` calls onnxruntime's InferenceSession (``ort.InferenceSession(...)`` or the bare name)."""
    lines = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "InferenceSession") or \
                    (isinstance(f, ast.Name) and f.id == "InferenceSession"):
                lines.append(node.lineno)
    return lines


def test_only_the_runtime_layer_opens_onnxruntime_sessions():
    assert _sessions_created("edgecli.runtimes.ort"), "the walker should see runtimes/ort.py's own session"
    outside = {m: ln for m in _modules() if not m.startswith("edgecli.runtimes") and (ln := _sessions_created(m))}
    assert not outside, "InferenceSession created outside edgecli/runtimes/: " + \
        ", ".join(f"{_modules()[m].relative_to(PKG.parent)}:{ln}" for m, ln in outside.items())


@pytest.mark.parametrize("module", [pytest.param(m, id=m.rsplit(".", 1)[-1] if m != "edgecli.stages" else "__init__")
                                    for m in _stage_files()])
def test_stage_module_length(module):
    n = len(_modules()[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_STAGE_LINES, f"{_modules()[module].relative_to(PKG.parent)} is {n} lines (at most {MAX_STAGE_LINES})"


def _long_functions(module: str) -> list[str]:
    out = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{node.name} ({n} lines, line {node.lineno})")
    return out


@pytest.mark.parametrize("module", [pytest.param(m, id=m.rsplit(".", 1)[-1] if m != "edgecli.stages" else "__init__")
                                    for m in _stage_files()])
def test_no_long_function_in_stages(module):
    long = _long_functions(module)
    assert not long, f"{_modules()[module].relative_to(PKG.parent)}: " + ", ".join(long)
