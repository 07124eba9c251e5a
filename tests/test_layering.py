"""The layering of the code base, checked by an AST scan of every import (no file is exempt).

```
core   kvcdn.errors  kvcdn.flags  kvcdn.spec  kvcdn.wire  kvcdn.store  kvcdn.model  kvcdn.cli
         ▲
         ├── origin        (core)
         ├── edge          (core without kvcdn.model: an edge never imports torch)
         └── client  ◀──  ops  ◀──  loadtest
```
Within the core: spec needs only errors; store builds on spec; wire on store; model on spec (and the wire
types, for the codecs); the CLI dispatches to components through entry points and imports none of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"kvcdn.errors", "kvcdn.flags", "kvcdn.spec", "kvcdn.wire", "kvcdn.store", "kvcdn.model", "kvcdn.v1"}
# unit -> the kvcdn units it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "kvcdn.errors": set(),
    "kvcdn.v1": set(),
    "kvcdn.samples": set(),
    "kvcdn.flags": set(),
    "kvcdn.spec": {"kvcdn.errors", "kvcdn.v1"},
    "kvcdn.store": {"kvcdn.errors", "kvcdn.v1", "kvcdn.spec"},
    "kvcdn.wire": {"kvcdn.errors", "kvcdn.v1", "kvcdn.spec", "kvcdn.store"},
    "kvcdn.model": {"kvcdn.errors", "kvcdn.spec", "kvcdn.v1"},
    "kvcdn.cli": {"kvcdn.errors", "kvcdn.wire"},
    "kvcdn.__main__": {"kvcdn.cli"},
    "kvcdn.__init__": set(),
    "origin": CORE,
    "edge": CORE - {"kvcdn.model"},
    "client": CORE,
    "ops": CORE | {"client"},
    "loadtest": CORE | {"client", "ops"},
}
# Third-party packages a unit must not import: what runs models stays out of what moves bytes.
MODEL_RUNTIME = {"torch", "transformers", "gguf", "accelerate"}
FORBIDDEN = {unit: MODEL_RUNTIME for unit in ("kvcdn.spec", "kvcdn.wire", "kvcdn.store", "kvcdn.flags", "edge")}
COMPONENTS = ("origin", "edge", "client", "ops", "loadtest")


def _unit_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kvcdn":
        return f"kvcdn.{rel.parts[1].removesuffix('.py')}"
    return rel.parts[0]


def _unit_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "kvcdn":
        return None
    if len(parts) == 1:
        return "kvcdn.__init__"
    return parts[1] if parts[1] in COMPONENTS else f"kvcdn.{parts[1]}"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if node.module == "kvcdn")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _sources() -> list[Path]:
    return sorted(p for top in ("kvcdn", *COMPONENTS) for p in (ROOT / top).rglob("*.py"))


def test_every_source_file_belongs_to_a_layer() -> None:
    units = {_unit_of_file(p) for p in _sources()}
    assert units <= set(ALLOWED), f"add these to ALLOWED: {sorted(units - set(ALLOWED))}"


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_each_unit_imports_only_what_its_layer_allows(unit: str) -> None:
    bad = []
    for path in _sources():
        if _unit_of_file(path) != unit:
            continue
        for module in _imports(path):
            imported = _unit_of_module(module)
            if imported is not None and imported != unit and imported not in ALLOWED[unit]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
            if module.split(".")[0] in FORBIDDEN.get(unit, set()):
                bad.append(f"{path.relative_to(ROOT)} imports {module} (no model runtime here)")
    assert not bad, "\n".join(bad)


def test_an_edge_process_and_the_command_line_never_load_the_model_runtime() -> None:
    """Beyond direct imports: nothing an edge or `kvcdn --help` loads pulls torch in indirectly."""
    code = (
        "import sys\n"
        "from kvcdn.cli import build_parser\n"
        "import kvcdn.edge.server, kvcdn.edge.cli\n"
        "build_parser().parse_args(['edge', '--origin', '127.0.0.1:1'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
