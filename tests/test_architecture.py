"""The shape of the house, checked: no import cycles in python/scaleset (type-only and lazy imports
count), calls go down the layers, and clients do not load the solver or the store."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import scaleset

PACKAGE = Path(scaleset.__file__).parent

#: Lower layers first; a module may import only from its own layer or below.
LAYERS = [
    {"_core", "errors", "model", "limits"},
    {"engine"},
    {"rebalance", "policies"},
    {"commands"},
    {"controller"},
    {"store", "postgres", "control", "documents", "prometheus"},
    {"dispatch"},
    {
        "convert",
        "service",
        "client",
        "cli",
        "__main__",
        "v1",
        "auth",
        "gateway",
        "executor",
        "instance",
        "cluster",
        "watchproxy",
    },
    {"testing"},
]


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        if name.startswith("scaleset.v1"):
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                deps.add(target)
                deps |= {f"{target}.{a.name}" for a in node.names}
        graph[name] = deps
    modules = set(graph)
    return {
        m: {d for d in deps if d in modules and d != m and not m.startswith(d + ".")}
        for m, deps in graph.items()
    }


def test_no_import_cycles() -> None:
    graph = module_graph()
    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        if m in done:
            return
        if m in visiting:
            cycles.append([*visiting[visiting.index(m) :], m])
            return
        visiting.append(m)
        for d in sorted(graph[m]):
            visit(d)
        visiting.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert cycles == []


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return len(LAYERS)  # the package root re-exports everything


def test_calls_go_down_the_layers() -> None:
    upward = [
        (m, d) for m, deps in module_graph().items() for d in deps if m != "scaleset" and layer(d) > layer(m)
    ]
    assert upward == []


def test_the_engine_knows_nothing_of_policies_commands_or_grpc() -> None:
    deps = module_graph()["scaleset.engine"]
    assert deps <= {"scaleset._core", "scaleset.errors", "scaleset.model"}


def test_a_client_does_not_load_the_solver_or_the_store() -> None:
    code = "import sys, scaleset.client; print(sorted(m for m in ('ortools', 'sqlite3', 'scaleset.rebalance') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_each_database_and_solver_library_has_one_owner() -> None:
    owners = {
        "sqlite3": "store.py",
        "psycopg": "postgres.py",
        "psycopg_pool": "postgres.py",
        "ortools": "rebalance.py",
    }
    found: dict[str, set[str]] = {lib: set() for lib in owners}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.split(".")[0] in owners and "testing" not in path.parts:
                    found[name.split(".")[0]].add(path.name)
    assert found == {lib: {owner} for lib, owner in owners.items()}
