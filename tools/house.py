"""Measure vlkit's house: its modules (rooms), their floors, the import graph's circles and arrows that point up,
files over 400 lines and functions over 60 lines.

    python tools/house.py [ROOT]        # ROOT: a checkout (default: this one)

A room is one module of ``vlkit/``; an arrow is any import of another vlkit module (also one inside a function:
it still ties the two together). A room's floor comes from :data:`FLOORS` (the longest matching name prefix):
an import may point to the same floor or below, never above. tests/test_house.py holds the graph to that.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

# the layers, lowest first: each room may import only rooms on its own floor or below
FLOORS: dict[str, int] = {
    # 0: plain helpers and the plugin contract's types
    "vlkit._atomic": 0, "vlkit._locks": 0, "vlkit._numerics": 0, "vlkit._proc": 0, "vlkit.types": 0,
    # 1: registries, checkpoints, data files; the ablation grid's expansion and its statistics on arrays
    "vlkit.registry": 1, "vlkit.checkpoint": 1, "vlkit.data": 1, "vlkit.ablate.grid": 1, "vlkit.ablate.cluster": 1,
    "vlkit.ablate.stats": 1, "vlkit.deepspeed_config": 1, "vlkit.published_configs": 1, "vlkit.random_init": 1,
    "vlkit.data.references": 1,
    # 2: components; the feature cache; the `expect:` grammar and run pairing; the distributed engines
    "vlkit.components": 2, "vlkit.cache": 2, "vlkit.data.tokenized": 2, "vlkit.ablate.expect": 2,
    "vlkit.ablate.pairing": 2, "vlkit.distributed": 2,
    # 3: the typed recipe (and the package root that re-exports it); findings and tables over a study's rows
    "vlkit.config": 3, "vlkit": 3, "vlkit.ablate.findings": 3, "vlkit.ablate.contrast": 3, "vlkit.ablate.tables": 3,
    "vlkit.ablate.plots": 3,
    "vlkit.ablate.run": 3,
    # 4-5: the toy world, the assembled model, evaluation
    "vlkit.toyworld": 4, "vlkit.model": 5, "vlkit.evaluate": 5,
    # 6-7: loading runs, inspecting, planning memory; training, predicting, exporting
    "vlkit.runs": 6, "vlkit.inspect": 6, "vlkit.plan": 6, "vlkit.train": 7, "vlkit.predict": 7, "vlkit.export": 7,
    # 8: what drives whole runs: ablation plans and reports, the lmms-eval adapter
    "vlkit.ablate": 8, "vlkit.lmms_eval_adapter": 8, "vlkit.lmms_eval_task": 8,
    # 9: the command line
    "vlkit.cli": 9,
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass
class Room:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)
    long_functions: list[tuple[str, int]] = field(default_factory=list)


def floor(name: str) -> int:
    """The floor of a module: that of the longest prefix in FLOORS (an unknown room is an error)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise KeyError(f"{name} has no floor: add it (or its package) to FLOORS in tools/house.py")


def module_name(root: Path, path: Path) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The vlkit rooms a module imports (``from a import b`` counts as ``a.b`` when that is a room)."""
    def room(target: str) -> str:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target

    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(room(a.name) for a in node.names if a.name.split(".")[0] == "vlkit")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "vlkit":
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else room(base))
    out.discard(name)
    out.discard("")
    return out


def _long_functions(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append((f"{node.name}:{node.lineno}", n))
    return out


def rooms(root: Path) -> dict[str, Room]:
    """Every module under ``root/vlkit`` with its imports of other vlkit modules and its long functions."""
    paths = sorted((root / "vlkit").rglob("*.py"))
    names = {module_name(root, p): p for p in paths}
    out = {}
    for name, path in names.items():
        text = path.read_text()
        tree = ast.parse(text)
        out[name] = Room(name, path, len(text.splitlines()), _imports(tree, name, path.name == "__init__.py",
                                                                       set(names)), _long_functions(tree))
    return out


def cycles(graph: dict[str, Room]) -> list[list[str]]:
    """Strongly connected components with more than one room (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v].imports):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_arrows(graph: dict[str, Room]) -> list[tuple[str, int, str, int]]:
    """Imports from a room to one on a higher floor: (from, its floor, to, its floor)."""
    return [(r.name, floor(r.name), t, floor(t)) for r in graph.values() for t in sorted(r.imports)
            if floor(t) > floor(r.name)]


def report(root: Path) -> str:
    graph = rooms(root)
    big = sorted((r for r in graph.values() if r.lines > MAX_FILE_LINES), key=lambda r: -r.lines)
    long = sorted(((f"{r.name}.{f}", n) for r in graph.values() for f, n in r.long_functions), key=lambda x: -x[1])
    circles = cycles(graph)
    up = upward_arrows(graph)
    lines = [f"rooms: {len(graph)} modules, {sum(r.lines for r in graph.values())} lines, "
             f"{sum(len(r.imports) for r in graph.values())} arrows, floors 0-{max(FLOORS.values())}",
             f"files over {MAX_FILE_LINES} lines: {len(big)}"]
    lines += [f"  {r.lines:5d}  {r.path.relative_to(root)}" for r in big]
    lines.append(f"functions over {MAX_FUNCTION_LINES} lines: {len(long)}")
    lines += [f"  {n:5d}  {f}" for f, n in long]
    lines.append(f"circles: {len(circles)}")
    lines += ["  " + " <-> ".join(c) for c in circles]
    lines.append(f"arrows up a floor: {len(up)}")
    lines += [f"  {a} (floor {fa}) -> {b} (floor {fb})" for a, fa, b, fb in up]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])))
