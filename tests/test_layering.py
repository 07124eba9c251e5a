"""The layering rules of STYLE.md, checked by an AST scan of imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package folder -> the kvcdn subpackages it may import
ALLOWED = {
    "kvcdn": set(),
    "origin": set(),
    "client": set(),
    "edge": {"client"},
    "loadtest": {"client"},
}
SUBPACKAGES = {"origin", "edge", "client", "loadtest"}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_their_layer_allows(package: str) -> None:
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        if package == "kvcdn" and path.name == "cli.py":
            continue  # the composition root wires every component together
        for module in _imports(path):
            parts = module.split(".")
            inner = parts[1] if parts[0] == "kvcdn" and len(parts) > 1 else ""
            if inner in SUBPACKAGES and inner != package and inner not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)
