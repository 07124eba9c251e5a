"""Starting an origin and N edges as separate `kvcdn` processes on loopback (`kvcdn up`, `kvcdn demo`),
waiting until each has bound its port, and stopping them all cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kvcdn.errors import InvalidArgument, Unavailable
from kvcdn.spec.provenance import generate_key
from kvcdn.wire.auth import ROLES, write_tokens
from kvcdn.wire.tls import TLSFiles, make_test_ca

__all__ = ["Cluster", "free_ports"]


def free_ports(host: str, n: int) -> list[int]:
    """n ports free on `host` right now (for servers that must know each other's addresses before
    they start, such as edges on a ring)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Cluster:
    """An origin and `edges` edges, started by `start()` (or `with`) and stopped by `stop()`."""

    store_dir: Path
    edges: int = 1
    host: str = "127.0.0.1"
    origin_args: list[str] = field(default_factory=list)
    """Extra `kvcdn origin` flags (model, dtype, device...)."""
    edge_args: list[str] = field(default_factory=list)
    """Extra `kvcdn edge` flags (tier sizes...)."""
    edge_args_by_index: dict[int, list[str]] = field(default_factory=dict)
    """Extra flags for one edge only (by its index: edge0, edge1, ...), e.g. to compare two settings."""
    edge_disk_root: Path | None = None
    """Give each edge a disk tier in a folder of its own under this one (edge0, edge1, ...)."""
    peers: bool = True
    """Tell every edge the ring (`kvcdn edge --peers`), so blocks it does not own come from their owners."""
    signed: bool = True
    """Sign with a publisher key kept in STORE/keys (made on first start) and have the edges require
    it (`--signing-key`, `--trust`); clients pin `trust_file`."""
    trust_file: Path | None = None
    """The publisher's public key, for clients' `--trust` (set by `start` when `signed`)."""
    untrusting: tuple[int, ...] = ()
    """Edges (by index) started without `--trust` all the same: a compromised edge, in attack tests."""
    auth: bool = False
    """Require tokens for Publish, Purge and Watch (`kvcdn origin --tokens`), made in STORE/keys on
    first start; the edges get theirs, publishers use `publisher_token_file`."""
    tls: bool = False
    """Serve every port in mutual TLS with a test CA made in STORE/keys/pki (`kvcdn certs`); clients
    use `client_tls`."""
    client_tls: TLSFiles | None = None
    """A client certificate and the CA (set by `start` when `tls`), for ClientConfig.tls / `--tls-*`."""
    server_tls: TLSFiles | None = None
    """The servers' certificate, key and CA (set by `start` when `tls`)."""
    closed_reads: bool = False
    """With `auth`: reads need a token too (`--closed-reads` on the origin, `--tokens` on the edges);
    agents use `reader_token_file`."""
    publisher_token_file: Path | None = None
    """The publisher's token (set by `start` when `auth`), for `--token-file`."""
    reader_token_file: Path | None = None
    """An agent's token (set by `start` when `auth`), for `--token-file` where reads are closed."""
    _edge_token_file: Path | None = None
    _tokens_file: Path | None = None
    _tls_args: list[str] = field(default_factory=list)
    origin_workers: int = 1
    """Origin processes (origin, origin1, ...) on one store; more than one needs `--catalog` in
    `origin_args` (kvcdn.origin.catalog). Edges use the first."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set for every process besides the inherited ones."""
    start_timeout_s: float = 600.0
    origin_address: str = ""
    origin_addresses: list[str] = field(default_factory=list)
    edge_addresses: list[str] = field(default_factory=list)
    metrics_urls: dict[str, str] = field(default_factory=dict)
    """Prometheus endpoint of each process by name (origin, edge0, ...)."""
    _procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def _spawn(self, name: str, args: list[str], port: int = 0) -> Path:
        assert self._tmp is not None
        port_file = Path(self._tmp.name) / f"{name}.addr"
        cmd = [
            sys.executable,
            "-m",
            "kvcdn",
            *args,
            "--listen",
            f"{self.host}:{port}",
            "--port-file",
            str(port_file),
        ]
        with (Path(self._tmp.name) / f"{name}.log").open("wb") as log:
            env = {**os.environ, **self.env}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self._procs.append((name, proc))
        return port_file

    def _wait(self, name: str, port_file: Path) -> str:
        assert self._tmp is not None
        deadline = time.monotonic() + self.start_timeout_s
        proc = self.process(name)
        while time.monotonic() < deadline:
            if port_file.exists():
                bound = json.loads(port_file.read_text())
                self.metrics_urls[name] = bound["metrics"]
                return str(bound["address"])
            if proc.poll() is not None:
                log = (Path(self._tmp.name) / f"{name}.log").read_text(errors="replace")
                raise Unavailable(f"{name} exited with status {proc.returncode}:\n{log[-3000:]}")
            time.sleep(0.05)
        raise Unavailable(f"{name} did not start within {self.start_timeout_s:.0f} s")

    def start(self) -> Cluster:
        if self.origin_workers > 1 and "--catalog" not in self.origin_args:
            raise InvalidArgument("several origin workers share a catalog: give origin_args a --catalog URL")
        self._tmp = tempfile.TemporaryDirectory(prefix="kvcdn-up-")
        try:
            signing: list[str] = []
            if self.signed:
                key = self.store_dir / "keys" / "publisher.key"
                if not key.exists():
                    generate_key(key)
                self.trust_file = key.with_suffix(".pub")
                signing = ["--signing-key", str(key)]
            if self.auth:
                keys = self.store_dir / "keys"
                table, tokens = keys / "tokens", {role: keys / f"{role}.token" for role in ROLES}
                if not all(f.exists() for f in (table, *tokens.values())):  # first start (or a role added since)
                    table, tokens = write_tokens(keys)
                self.publisher_token_file, self._edge_token_file = tokens["publisher"], tokens["edge"]
                self.reader_token_file, self._tokens_file = tokens["reader"], table
                signing += ["--tokens", str(table), *(["--closed-reads"] if self.closed_reads else [])]
            if self.tls:
                pki = make_test_ca(self.store_dir / "keys" / "pki", [self.host])
                self._tls_args = [
                    *("--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"])),
                    *("--tls-ca", str(pki["ca"])),
                ]
                self.client_tls = TLSFiles(pki["client"], pki["client_key"], pki["ca"])
                self.server_tls = TLSFiles(pki["server"], pki["server_key"], pki["ca"])
                signing += self._tls_args
            origin_args = ["origin", "--store", str(self.store_dir), *signing, *self.origin_args]
            names = ["origin", *(f"origin{i}" for i in range(1, self.origin_workers))]
            named = self.origin_workers > 1 or "--catalog" in self.origin_args
            workers = [["--worker", name] if named else [] for name in names]
            files = [self._spawn(name, [*origin_args, *w]) for name, w in zip(names, workers, strict=True)]
            self.origin_addresses = [self._wait(name, f) for name, f in zip(names, files, strict=True)]
            self.origin_address = self.origin_addresses[0]
            # With peers, every edge must know the others' addresses before it starts: pick free ports.
            ports = free_ports(self.host, self.edges) if self.peers else [0] * self.edges
            ring = ["--peers", ",".join(f"{self.host}:{p}" for p in ports)] if self.peers else []
            files = [self._spawn(f"edge{i}", [*self._edge_command(i), *ring], ports[i]) for i in range(self.edges)]
            self.edge_addresses = [self._wait(f"edge{i}", f) for i, f in enumerate(files)]
        except BaseException:
            self.stop()
            raise
        return self

    def _edge_command(self, i: int) -> list[str]:
        disk = ["--disk-dir", str(self.edge_disk_root / f"edge{i}")] if self.edge_disk_root is not None else []
        trust = ["--trust", str(self.trust_file)] if self.trust_file is not None and i not in self.untrusting else []
        if self._edge_token_file is not None:
            trust += ["--token-file", str(self._edge_token_file)]
        if self.closed_reads and self._tokens_file is not None:
            trust += ["--tokens", str(self._tokens_file)]
        mine = self.edge_args_by_index.get(i, [])
        return ["edge", "--origin", self.origin_address, *disk, *trust, *self._tls_args, *self.edge_args, *mine]

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """The process of `name` (origin, edge0, edge1, ...), e.g. to signal it in a fault test."""
        return dict(self._procs)[name]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every process (edges first), then SIGKILL what has not exited in time."""
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in reversed(self._procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
