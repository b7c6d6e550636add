"""The shape of the code: the import graph has no cycle but the convenience pair
`Plan.inverse` makes (plan <-> reverse), `import ckptmap` imports no torch, and
docs/architecture.md shows the graph as it is."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ckptmap"
ALLOWED = [["plan", "reverse"]]  # Plan.inverse() reaches the reverser, which builds a Plan


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (inside functions too; not TYPE_CHECKING)."""
    mods = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts) or "ckptmap"] = (p, is_pkg)
    graph = {m: set() for m in mods}
    for m, (p, is_pkg) in mods.items():
        tree = ast.parse(p.read_text())
        skip = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING":
                skip.update(id(x) for x in ast.walk(n))
        here = [] if m == "ckptmap" else m.split(".")
        package = here if is_pkg else here[:-1]
        for n in ast.walk(tree):
            if not isinstance(n, ast.ImportFrom) or id(n) in skip or n.level == 0:
                continue
            base = package[: len(package) - (n.level - 1)] if n.level > 1 else package
            target = ".".join([*base, *(n.module.split(".") if n.module else [])]) or "ckptmap"
            if target in mods:
                graph[m].add(target)
            for alias in n.names:
                sub = ".".join(filter(None, [target if target != "ckptmap" else "", alias.name]))
                if sub in mods:
                    graph[m].add(sub)
        graph[m].discard(m)
    return graph


def cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_lines() -> list[str]:
    graph = import_graph(SRC)
    return [f"{m} -> {', '.join(sorted(graph[m])) or '(nothing)'}" for m in sorted(graph)]


def test_no_import_cycle_but_the_convenience_pair():
    assert cycles(import_graph(SRC)) == ALLOWED


def test_import_ckptmap_imports_no_torch():
    code = "import sys, ckptmap, ckptmap.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_architecture_page_shows_the_import_graph():
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = page.split("```text import-graph\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == graph_lines(), "\n".join(graph_lines())


def test_no_function_is_longer_than_80_lines():
    long = []
    for p in sorted(SRC.rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = n.end_lineno - n.lineno + 1
                if lines >= 80:
                    long.append(f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({lines} lines)")
    assert not long, long
