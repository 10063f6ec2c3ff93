"""Lower layers never import upper ones: the core packages, the gateway, the evaluation, the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package may import the packages of the layers below it, never those above.
LAYERS = (
    ("chat",),
    ("classifier", "corruption", "offset"),
    ("server",),
    ("evaluation",),
    ("obliviate",),
)


def _imports(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Top-level project packages each module of `package` imports (absolute imports)."""
    out: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        out[str(path.relative_to(root))] = found
    return out


def test_no_package_imports_a_layer_above_it() -> None:
    wrong = []
    for level, packages in enumerate(LAYERS):
        above = {p for layer in LAYERS[level + 1 :] for p in layer}
        for package in packages:
            for module, imported in _imports(package).items():
                wrong += [f"{module} imports {p}" for p in sorted(imported & above)]
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "cli.py").write_text("import os\nfrom evaluation.cli import X\n")
    assert _imports("server", tmp_path) == {"server/cli.py": {"os", "evaluation"}}


def _module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Project module -> project modules it imports (at any depth of the file: lazy imports
    inside functions count, they still tie the two modules together)."""
    files = {}
    for layer in LAYERS:
        for package in layer:
            for path in (root / package).rglob("*.py"):
                name = ".".join(path.relative_to(root).with_suffix("").parts)
                files[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                deps.update(s for s in subs if s in files)  # `from pkg import module`
                if node.module in files and not all(s in files for s in subs):
                    deps.add(node.module)
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while (w := stack.pop()) != v:
                group.add(w)
            if group:
                found.append(group | {v})

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_sees_a_lazy_circle() -> None:
    graph = {"a.runner": {"a.report"}, "a.report": {"a.config"}, "a.config": set()}
    assert _cycles(graph) == []
    graph["a.config"] = {"a.runner"}  # e.g. an import inside a function
    assert _cycles(graph) == [{"a.runner", "a.report", "a.config"}]
