"""The library stays below the application: no import circle among clipbd's modules (function-local
imports included), and no library module imports the application (docs/architecture.md, Layering)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIB = ("clipbd.attacks", "clipbd.detectors", "clipbd.data", "clipbd.models", "clipbd.inspect", "clipbd.metrics")
APP = ("clipbd.stages", "clipbd.run", "clipbd.launch", "clipbd.cli")


def _graph() -> dict[str, set[str]]:
    mods = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
            for f in SRC.rglob("*.py")}
    g = {}
    for name, f in mods.items():
        pkg, out = (name if f.name == "__init__.py" else name.rpartition(".")[0]), set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - n.level + 1] + ([base] if base else []))
                out |= {base} | {f"{base}.{a.name}" for a in n.names}
        g[name] = {d for d in out if d in mods and d != name}
    return g


def test_library_never_imports_the_application():
    g = _graph()
    up = [f"{a} -> {b}" for a in sorted(g) for b in sorted(g[a]) if a.startswith(LIB) and b.startswith(APP)]
    assert not up, up


def test_no_stage_imports_another_stage():
    g = _graph()
    bad = [f"{a} -> {b}" for a in g if a.startswith("clipbd.stages.") for b in g[a] if b.startswith("clipbd.stages.")]
    assert not bad, bad


def test_no_import_cycle():
    g, state, cycles = _graph(), {}, []

    def visit(v, stack):
        state[v] = "open"
        for w in sorted(g[v]):
            if state.get(w) == "open":
                cycles.append(" -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                visit(w, stack + [w])
        state[v] = "done"

    for v in sorted(g):
        if v not in state:
            visit(v, [v])
    assert not cycles, cycles[:5]
