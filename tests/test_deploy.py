"""The container image's recipe (deploy/docker/Dockerfile, not built on this machine: no Docker
daemon) and `kvcdn health`, the probe it and orchestrators run."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from kvcdn.ops.launcher import Cluster
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip().removesuffix("\\")
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_copies_every_package_and_runs_as_a_user_without_a_model() -> None:
    steps = _instructions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"kvcdn", *project["package-dir"].values()}
    copied = {args.split()[0] for op, args in steps if op == "COPY" and "--from" not in args}
    assert folders <= copied, f"the image misses {sorted(folders - copied)}"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert not any(".gguf" in args or "safetensors" in args for _, args in steps)  # no model baked in
    (check,) = [args for op, args in steps if op == "HEALTHCHECK"]
    assert "kvcdn health" in check
    assert len([1 for op, _ in steps if op == "FROM"]) == 2  # multi-stage


def _health(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kvcdn", "health", address, "--timeout", "5", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_health_says_serving_for_live_servers_and_unavailable_for_a_closed_port(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model, args = tiny_llama(tiny_dirs)
    with Cluster(store_dir=tmp_path / "store", edges=1, origin_args=args, start_timeout_s=120) as cluster:
        fingerprint = model.fingerprint_hex
        for address in (cluster.origin_address, cluster.edge_addresses[0]):
            answer = _health(address)
            assert answer.returncode == 0 and f"{address}: SERVING" in answer.stdout, answer.stderr
            assert f"fingerprint {fingerprint}" in answer.stdout  # what vLLM's connector is configured with
        gone = cluster.edge_addresses[0]
    answer = _health(gone)  # the network has stopped
    assert answer.returncode == 2 and "UNAVAILABLE" in answer.stderr


def test_health_over_mutual_tls_presents_the_probe_certificate(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    _, args = tiny_llama(tiny_dirs)
    with Cluster(store_dir=tmp_path / "store", edges=1, origin_args=args, tls=True, start_timeout_s=120) as cluster:
        files = cluster.client_tls
        assert files is not None and files.cert is not None and files.key is not None and files.ca is not None
        flags = ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
        address = cluster.edge_addresses[0]
        answer = _health(address, *flags)
        assert answer.returncode == 0 and "SERVING" in answer.stdout, answer.stderr
        assert _health(address).returncode == 2  # plaintext at a TLS port: no answer
