"""Lower layers never import upper ones: the core packages, the gateway, the evaluation, the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package may import the packages of the layers below it, never those above.
LAYERS = (("classifier", "corruption", "offset"), ("server",), ("evaluation",), ("obliviate",))


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
