"""The layering of the code base, checked by an AST scan of every import (no file is exempt).

```
core   kvcdn.errors  kvcdn.flags  kvcdn.tuning  kvcdn.spec  kvcdn.wire  kvcdn.store  kvcdn.model  kvcdn.cli
         ▲
         ├── origin        (core)
         ├── edge          (core without kvcdn.model: an edge never imports torch)
         └── client  ◀──  ops  ◀──  loadtest
               ▲
               └── integrations  (a vLLM connector: client and core, imported in vLLM's environment)
```
Within the core: spec needs only errors; store builds on spec; wire on store; model on spec (and the wire
types, for the codecs); the CLI dispatches to components through entry points and imports none of them,
nor any of the core beyond the leaves errors and tuning. Relative imports count as what they resolve
to. No module outside the generated kvcdn/v1 is longer than `MAX_LINES`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {
    "kvcdn.errors",
    "kvcdn.flags",
    "kvcdn.tuning",
    "kvcdn.spec",
    "kvcdn.wire",
    "kvcdn.store",
    "kvcdn.model",
    "kvcdn.v1",
}
# unit -> the kvcdn units it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "kvcdn.errors": set(),
    "kvcdn.v1": set(),
    "kvcdn.samples": set(),
    "kvcdn.flags": set(),
    "kvcdn.tuning": set(),
    "kvcdn.spec": {"kvcdn.errors", "kvcdn.v1"},
    "kvcdn.store": {"kvcdn.errors", "kvcdn.v1", "kvcdn.spec"},
    "kvcdn.wire": {"kvcdn.errors", "kvcdn.v1", "kvcdn.spec", "kvcdn.store"},
    "kvcdn.model": {"kvcdn.errors", "kvcdn.spec", "kvcdn.v1"},
    "kvcdn.cli": {"kvcdn.errors", "kvcdn.tuning"},
    "kvcdn.__main__": {"kvcdn.cli"},
    "kvcdn.__init__": set(),
    "origin": CORE,
    "edge": CORE - {"kvcdn.model"},
    "client": CORE,
    "ops": CORE | {"client"},
    "loadtest": CORE | {"client", "ops"},
    "integrations": CORE | {"client"},
}
# Third-party packages a unit must not import: what runs models stays out of what moves bytes.
MODEL_RUNTIME = {"torch", "transformers", "gguf", "accelerate"}
FORBIDDEN = {
    unit: MODEL_RUNTIME for unit in ("kvcdn.spec", "kvcdn.wire", "kvcdn.store", "kvcdn.flags", "kvcdn.tuning", "edge")
}
COMPONENTS = ("origin", "edge", "client", "ops", "loadtest", "integrations")
MAX_LINES = 450
"""The longest a hand-written module may be (a longer one is split where its parts separate)."""


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


def _package_of(path: Path) -> list[str]:
    """The dotted package a file is imported as (components are installed as kvcdn.<component>)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1])
    return package if package[0] == "kvcdn" else ["kvcdn", *package]


def _imports(path: Path) -> set[str]:
    return _imports_in(path.read_text(), _package_of(path))


def _imports_in(source: str, package: list[str]) -> set[str]:
    """Every module `source` (a module of `package`) imports, relative imports resolved."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # `from . import x`, `from ..wire import y`: resolved against the file's package
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names if module == "kvcdn" or node.level)
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


def test_relative_imports_are_checked_as_what_they_resolve_to() -> None:
    # A relative import must not slip past the scan: `from ..model import codecs` in an edge module
    # resolves to kvcdn.model.codecs, which an edge may not import.
    assert _package_of(ROOT / "edge" / "peers.py") == ["kvcdn", "edge"]
    assert _package_of(ROOT / "kvcdn" / "model" / "codecs" / "fp8.py") == ["kvcdn", "model", "codecs"]
    imported = _imports_in(
        "from ..model import codecs\nfrom . import tiers\nfrom .pulls import Pull\n", ["kvcdn", "edge"]
    )
    assert {"kvcdn.model.codecs", "kvcdn.edge.tiers", "kvcdn.edge.pulls"} <= imported
    assert "kvcdn.model.codecs" in imported and "kvcdn.edge.tiers" in imported
    assert _unit_of_module("kvcdn.model.codecs") not in ALLOWED["edge"]


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources()
        if "v1" not in p.relative_to(ROOT).parts and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (at most {MAX_LINES} lines): {long}"
