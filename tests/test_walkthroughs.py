"""Every walkthrough the README and docs/ tell a user to run, run as written through the real CLI.

A walkthrough is a ```console block right after a `<!-- walkthrough: NAME -->` comment. Its lines that
start with `$ ` are commands, run by bash in order from a scratch folder that holds the repository's
`kvcdn/samples` (so the paths a user types from a checkout resolve); each must exit 0, and the lines
after it, up to the next command, must each appear in what it printed. `$ kvcdn up ... &` is the one
command that keeps running: it is started in the background, the `export` lines it prints are applied
to the commands after it (as the user is told to do), and it is stopped at the end of the block.
Every other block of commands on those pages says why it is not one (`<!-- not a walkthrough: WHY -->`).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"<!-- walkthrough: ([\w-]+) -->\s*\n```console\n(.*?)\n```", re.DOTALL)
_EXPORT = re.compile(r"^export (\w+)=(\S+)")
_FENCE = re.compile(r"(<!-- (?:not a )?walkthrough: [^>]+ -->\s*\n)?```\w*\n(.*?)\n```", re.DOTALL)
_COMMAND = re.compile(r"^(\$ )?(kvcdn|make|export|python3?|pip) ")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    """Lines its output must contain, in any order."""


def walkthroughs() -> dict[str, tuple[Path, list[Step]]]:
    """Every walkthrough of the README and the docs/ pages, by name."""
    found: dict[str, tuple[Path, list[Step]]] = {}
    for page in PAGES:
        for name, body in _BLOCK.findall(page.read_text()):
            steps: list[Step] = []
            for line in body.splitlines():
                if line.startswith("$ "):
                    steps.append(Step(line[2:].strip()))
                elif line.strip():
                    assert steps, f"{page.name} walkthrough {name}: output before any command"
                    steps[-1].expected.append(line.strip())
            assert name not in found, f"two walkthroughs named {name}"
            found[name] = (page, steps)
    return found


WALKTHROUGHS = walkthroughs()


def test_the_pages_hold_the_walkthroughs_users_are_told_to_run() -> None:
    assert {"session-by-hand", "load-tester", "trust-and-tls"} <= set(WALKTHROUGHS)
    for name, (page, steps) in WALKTHROUGHS.items():
        assert steps and all(s.command for s in steps), f"{page.name}: walkthrough {name} has no command"


def test_every_block_of_commands_is_a_walkthrough_or_says_why_not() -> None:
    for page in PAGES:
        for marker, body in _FENCE.findall(page.read_text()):
            if _COMMAND.match(body):
                assert marker, f"{page.name}: a block of commands with no walkthrough marker: {body[:80]!r}"


def _start_up(command: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """`kvcdn up ... &`: started, its exports applied to `env` once it says it is ready."""
    args = shlex.split(command.removesuffix("&").split(" #")[0])
    assert args[0] == "kvcdn", f"only `kvcdn up` runs in the background here: {command}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvcdn", *args[1:]],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.stdout.close()
            raise AssertionError(f"`{command}` exited ({proc.wait()}) before it was ready")
        if m := _EXPORT.match(line):
            env[m.group(1)] = m.group(2)
        if line.startswith("# ready"):
            return proc
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"`{command}` was not ready within 300 s")


@pytest.mark.parametrize("name", sorted(WALKTHROUGHS))
def test_walkthrough_runs_as_written(name: str, tmp_path: Path) -> None:
    page, steps = WALKTHROUGHS[name]
    (tmp_path / "kvcdn").mkdir()
    (tmp_path / "kvcdn" / "samples").symlink_to(ROOT / "kvcdn" / "samples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCDN_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `kvcdn` as installed
    background: list[subprocess.Popen[str]] = []
    try:
        for step in steps:
            if step.command.endswith("&"):
                background.append(_start_up(step.command, env, tmp_path))
                continue
            done = subprocess.run(
                ["bash", "-c", step.command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            said = done.stdout + done.stderr
            where = f"{page.name} walkthrough {name}: `{step.command}`"
            assert done.returncode == 0, f"{where} exited {done.returncode}:\n{said[-3000:]}"
            for line in step.expected:
                assert line in said, f"{where} did not print {line!r}:\n{said[-3000:]}"
    finally:
        for proc in background:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
