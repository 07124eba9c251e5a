"""Several hosts on one machine: the origin and two edges each in a network namespace of their own,
joined by veth links to a bridge the agent (this process) sits on, so every hop crosses a real
interface and addresses are not loopback; inside the namespaces hosts have names (the edges reach
the origin as origin.kvcdn.test). Then one edge is cut off from the origin and from its
peer (blackhole routes in its namespace: packets vanish, as in a real partition, while agents still
reach it), and an agent still gets the whole cache, exact, from the other edge.

Needs root and `ip netns` (iproute2); skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.model import adapter
from kvcdn.model.prompt import document_ids
from tests.conftest import SAMPLES, tiny_llama

PREFIX = f"kvn{os.getpid() % 10000}"
BRIDGE = f"{PREFIX}br"
AGENT_IP = "10.77.0.1"
HOSTS = {"origin": "10.77.0.10", "edge1": "10.77.0.11", "edge2": "10.77.0.12"}
DOMAIN = "kvcdn.test"
"""Each host's name is NAME.kvcdn.test inside the namespaces (`ip netns exec` reads /etc/netns/NS/hosts
as /etc/hosts): the edges reach the origin by its name."""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def _resolve(ns: str, name: str) -> str:
    """The address `name` resolves to inside namespace `ns` ("" if none)."""
    cmd = ["ip", "netns", "exec", ns, "getent", "hosts", name]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.split()
    return out[0] if out else ""


def _why_not() -> str:
    """Why network namespaces cannot be made here ("" when they can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (Debian: iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}probe"
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", f"{PREFIX}pb", "type", "bridge")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"this machine does not allow network namespaces and bridges: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{PREFIX}pb"], capture_output=True)
    return ""


_WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or "")


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """A namespace per host in HOSTS, each with a veth to the bridge; the agent is on the bridge."""
    made: list[str] = []
    names = "".join(f"{address} {name}.{DOMAIN}\n" for name, address in HOSTS.items())
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{AGENT_IP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, (name, address) in enumerate(HOSTS.items()):
            ns, outside, inside = f"{PREFIX}{name}", f"{PREFIX}o{i}", f"{PREFIX}i{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / ns / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", BRIDGE, "up")
            _ip("addr", "add", f"{address}/24", "dev", inside, ns=ns)
            _ip("link", "set", inside, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        yield {name: f"{PREFIX}{name}" for name in HOSTS}
    finally:
        for i, ns in enumerate(made):
            subprocess.run(["ip", "link", "del", f"{PREFIX}o{i}"], capture_output=True)  # and its other end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def _spawn(ns: str, args: list[str], port_file: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "kvcdn", *args, "--port-file", str(port_file)]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen[bytes], port_file: Path, log: Path, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"did not start:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.05)
    return str(json.loads(port_file.read_text())["address"])


async def test_an_edge_cut_off_from_the_origin_and_its_peer_costs_agents_only_a_failover(
    hosts: dict[str, str], tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model, model_args = tiny_llama(tiny_dirs)
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> str:
        port_file, log = tmp_path / f"{name}.addr", tmp_path / f"{name}.log"
        procs.append(_spawn(hosts[name], args, port_file, log))
        return _wait(procs[-1], port_file, log)

    try:
        origin = start(
            "origin",
            [
                "origin",
                "--store",
                str(tmp_path / "store"),
                "--listen",
                f"{HOSTS['origin']}:7070",
                "--insecure",
                *model_args,
            ],
        )
        ring = [f"{HOSTS[e]}:7080" for e in ("edge1", "edge2")]
        # The edges know the origin by its name, resolved in their own namespaces.
        assert _resolve(hosts["edge1"], f"origin.{DOMAIN}") == HOSTS["origin"]
        named_origin = f"origin.{DOMAIN}:{origin.rsplit(':', 1)[1]}"
        for edge in ("edge1", "edge2"):
            start(
                edge,
                ["edge", "--origin", named_origin, "--listen", f"{HOSTS[edge]}:7080", "--peers", ",".join(ring)],
            )
        texts = {name: (SAMPLES / name).read_text()[:3000] for name in ("apache-2.0.txt", "mpl-2.0.txt")}
        async with CacheReader(origin) as publisher:  # the agent's host reaches the origin's over the bridge
            for name, text in texts.items():
                await publisher.publish(name, text)
        config = ClientConfig(tuple(ring), timeout_s=2.0, stream_timeout_s=5.0)

        async def fetch(name: str) -> list[str]:
            doc = document_ids(model.tokenizer, texts[name])
            async with KVClient(config) as client:
                fetched = await client.fetch(model, doc)
            assert fetched.cached_tokens == len(doc)
            for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
                assert torch.equal(k, rk) and torch.equal(v, rv)
            return list(fetched.edges_used)  # the edges asked

        assert sorted(await fetch("apache-2.0.txt")) == sorted(ring)  # both edges served, across the links

        # The partition: edge1's packets to the origin and to edge2 vanish; agents still reach edge1.
        for peer in ("origin", "edge2"):
            _ip("route", "add", "blackhole", f"{HOSTS[peer]}/32", ns=hosts["edge1"])
        started = time.monotonic()
        used = await fetch("mpl-2.0.txt")  # not on any edge yet: edge1 cannot load its share
        assert ring[1] in used and set(used) <= set(ring), used  # edge2 took over what edge1 could not send
        assert time.monotonic() - started < 60  # a failover bounded by the client's deadlines
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
