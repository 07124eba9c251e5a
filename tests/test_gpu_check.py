"""`make gpu-check` ready to run on a device lent for minutes: every step of its plan is accepted by
the commands it runs, its timeouts fit the budget, and the wheels it carries hold every package kvcdn
imports that the GPU machine's image lacks (a missing one stops the origin or the edges at start)."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kvcdn.cli import build_parser
from kvcdn.loadtest.cli import bench_config
from kvcdn.model.options import ModelOptions

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "scripts" / "gpu-check.plan"
WHEELS = ROOT / "scripts" / "gpu-wheels.txt"
BUDGET_S = 290
"""The plan's tests and benches together (TUNE's rows apart): a device lent for 15 minutes, a start
taking 1-2 of them, runs the check twice."""
PACKAGES = ("kvcdn", "origin", "edge", "client", "ops", "loadtest")
"""What the check's processes import from (integrations/ is vLLM's side, not on a GPU check)."""
TESTS = ("conftest.py", "tinymodels.py", "test_gpu.py")
"""The test files the check runs (tests/)."""
GPU_MACHINE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
GPU_MACHINE |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
GPU_MACHINE |= {"implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _steps() -> list[tuple[str, int, list[str]]]:
    steps = []
    for line in PLAN.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            step, limit, *flags = line.split()
            steps.append((step, int(limit), flags))
    return steps


def test_every_bench_of_the_plan_is_accepted_and_the_plan_fits_its_budget() -> None:
    steps = _steps()
    assert {s for s, _, _ in steps} == {"tests", "bench", "tune"}
    assert sum(limit for step, limit, _ in steps if step != "tune") <= BUDGET_S
    measured: dict[str, set[tuple[str, int]]] = {}
    for step, _, flags in steps:
        if step == "tests":
            continue
        # As the script runs it; the flags' own checks (a frame over 3 MiB, an unknown codec) refuse here.
        args = build_parser().parse_args(["loadtest", "bench", *flags, "--markdown", "--json", "bench.json"])
        config, options = bench_config(args), ModelOptions.from_args(args)
        assert options.device == "cuda" and args.geometry and config.edges == 4
        if step == "bench":
            assert config.each_codec
            for codec in config.codecs:
                measured.setdefault(args.geometry, set()).update((codec, n) for n in config.lengths)
    # The crossover per codec at the four lengths for Qwen3-4B; the second geometry in raw and int8.
    lengths = (1024, 3774, 16384, 32768)
    assert {(c, n) for c in ("raw", "int8", "fp8", "int4") for n in lengths} <= measured["qwen3-4b"]
    assert {(c, n) for c in ("raw", "int8") for n in lengths[:3]} <= measured["llama3.1-8b"]


def _listed() -> tuple[set[str], set[str], set[str]]:
    """(carried as wheels, in the image, not needed there) as gpu-wheels.txt names them."""
    carried, image, unneeded = set(), set(), set()
    for line in WHEELS.read_text().splitlines():
        if line.startswith("# image:"):
            image |= {canonicalize_name(n) for n in line.removeprefix("# image:").split()}
        elif line.startswith("# not needed there:"):
            unneeded |= {canonicalize_name(n) for n in line.removeprefix("# not needed there:").split(",")[0].split()}
        elif line.strip() and not line.startswith("#"):
            carried.add(canonicalize_name(Requirement(line).name))
    return carried, image, unneeded


def _imported_distributions() -> set[str]:
    """The distributions whose modules kvcdn's code and the check's tests import (anywhere in a file:
    a lazy import runs too)."""
    owners = metadata.packages_distributions()
    found = set()
    sources = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    for path in [*sources, *(ROOT / "tests" / name for name in TESTS)]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("kvcdn", "tests"):
                    found |= {canonicalize_name(d) for d in owners.get(top, [top])}  # not installed: its name
    return found


def _needs(distribution: str) -> set[str]:
    """What `distribution` (as installed here) requires on the GPU machine's Python."""
    out = set()
    for text in metadata.requires(distribution) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(GPU_MACHINE | {"extra": ""}):
            out.add(canonicalize_name(req.name))
    return out


def test_the_carried_wheels_hold_what_kvcdn_imports_and_what_they_need() -> None:
    carried, image, unneeded = _listed()
    assert not carried & image, "a package is both carried and said to be in the image"
    imported = _imported_distributions()
    assert {"joserfc", "psycopg", "torch", "grpcio"} <= imported  # the scan sees kvcdn's imports
    missing = imported - carried - image - unneeded
    assert not missing, f"add to scripts/gpu-wheels.txt (kvcdn or the check's tests import them): {sorted(missing)}"
    # What the carried wheels need in turn (psycopg's C library, pydantic's core, ...), to the image's edge.
    seen: set[str] = set()
    todo = sorted(carried)
    while todo:
        name = todo.pop()
        if name in seen or name in image or name in unneeded:
            continue
        seen.add(name)
        todo += sorted(_needs(name))
    assert not seen - carried, f"carried wheels need these too: {sorted(seen - carried)}"
