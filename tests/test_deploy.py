"""The container image's recipe (deploy/docker/Dockerfile; `make image-check` builds and runs it with
buildah, outside the suite: it needs root and minutes), the Kubernetes manifests (deploy/k8s,
checked against the API's schemas and kvcdn's own flags), and `kvcdn health`, the probe they run."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvcdn.cli import build_parser
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


def test_every_package_folder_is_installed_by_a_non_editable_install() -> None:
    """An editable install (`make install`) finds every folder; a wheel or an image carries only the
    packages pyproject.toml lists: a subpackage left out breaks them alone (it once did: the codecs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"kvcdn": "kvcdn", **{folder: name for name, folder in project["package-dir"].items()}}
    found = set()
    for top, name in folders.items():
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join([name, *parts]))
    assert found == set(project["packages"]), f"not listed: {sorted(found - set(project['packages']))}"


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


K8S = ROOT / "deploy" / "k8s"


def _manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object deploy/k8s defines (kustomization.yaml aside: kustomize's, not the API's)."""
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_the_kubernetes_manifests_validate_against_the_api_schemas_and_kustomize_applies_them_all() -> None:
    version = kubernetes_validate.latest_version()
    manifests = _manifests()
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)
    assert {(d["kind"], d["metadata"]["name"]) for d in manifests} == {
        ("Namespace", "kvcdn"),
        ("Service", "kvcdn-origin"),
        ("StatefulSet", "kvcdn-origin"),
        ("ConfigMap", "kvcdn-ring"),
        ("Service", "kvcdn-edge"),
        ("StatefulSet", "kvcdn-edge"),
        ("PodDisruptionBudget", "kvcdn-edge"),
    }
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    broken = copy.deepcopy(_one("StatefulSet", "kvcdn-edge"))
    broken["spec"]["replica"] = 3  # a misspelt field: the schemas must catch it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def _args(statefulset: dict[str, Any], pod: str) -> list[list[str]]:
    spec = statefulset["spec"]["template"]["spec"]
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    return [[a.replace("$(POD_NAME)", pod) for a in c["args"]] for c in containers]


def test_the_pods_run_kvcdn_with_flags_it_accepts_mtls_on_every_hop_and_probes_through_kvcdn_health() -> None:
    parser = build_parser()
    namespace = "kvcdn"
    for name in ("kvcdn-origin", "kvcdn-edge"):
        statefulset = _one("StatefulSet", name)
        for args in _args(statefulset, f"{name}-0"):
            parser.parse_args(args)  # SystemExit on a flag kvcdn does not have
        server = _args(statefulset, f"{name}-0")[-1]
        flags = dict(a.removeprefix("--").split("=", 1) for a in server[1:])
        assert {"tls-cert", "tls-key", "tls-ca"} <= set(flags)  # mTLS on every port
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        port = flags["listen"].rsplit(":", 1)[1]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["kvcdn", "health", f"127.0.0.1:{port}"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert [env[f"KVCDN_TLS_{k}"] for k in ("CERT", "KEY", "CA")] == [
            flags[f"tls-{k}"] for k in ("cert", "key", "ca")
        ]
        service = _one("Service", name)
        assert {p["port"] for p in service["spec"]["ports"]} == {int(port), int(flags["bulk-port"]), 9100}
        if name == "kvcdn-origin":
            assert "tokens" in flags and "signing-key" in flags  # secure by default: writes need a token
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        else:
            assert "token-file" in flags and "trust" in flags
            assert service["spec"]["clusterIP"] == "None"
            domain = f"{statefulset['spec']['serviceName']}.{namespace}.svc.cluster.local"
            replicas = statefulset["spec"]["replicas"]
            ring_file = Path(flags["peers"].removeprefix("@"))  # followed while the edge runs
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(ring_file.parent)]
            (volume,) = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
            assert "subPath" not in mount  # a subPath mount is never updated
            ring = _one("ConfigMap", volume["configMap"]["name"])["data"][ring_file.name]
            assert ring.split() == [f"{name}-{i}.{domain}:{port}" for i in range(replicas)]
            assert flags["advertise"] == f"{name}-0.{domain}:{port}"
            assert flags["origin"] == f"kvcdn-origin.{namespace}.svc.cluster.local:7070"
    budget = _one("PodDisruptionBudget", "kvcdn-edge")
    assert budget["spec"]["selector"] == _one("StatefulSet", "kvcdn-edge")["spec"]["selector"]


def test_every_secret_the_pods_mount_is_one_the_deploy_guide_creates() -> None:
    mounted = {
        volume["secret"]["secretName"]
        for name in ("kvcdn-origin", "kvcdn-edge")
        for volume in _one("StatefulSet", name)["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    created = set(re.findall(r"kubectl -n kvcdn create secret generic ([a-z0-9-]+)", guide))
    assert mounted == created
