"""The operators' commands (`up`, `stats`, `demo`, `provision`, `keys`, `certs`, `health`, `ledger`), registered with
kvcdn.cli."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcdn.errors import InvalidArgument, KVCDNError
from kvcdn.flags import add_connection_flags, add_edges_flag, add_origin_flag, add_tls_flags, parse_size
from kvcdn.model.options import ModelOptions
from kvcdn.ops.ledger_cli import register_ledger

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the operators' commands to the `kvcdn` subcommands (`sub`: argparse's subparsers)."""
    s = sub.add_parser("up", help="origin + N edges as processes on loopback, until Ctrl-C")
    s.add_argument("--edges", type=int, default=1)
    s.add_argument("--store", help="store folder (default: a temporary one)")
    s.add_argument("--mem-bytes", type=parse_size, default=parse_size("1GiB"), help="each edge's memory tier (1GiB)")
    s.add_argument(
        "--disk-bytes",
        type=parse_size,
        help="give each edge a disk tier of this size, under STORE/edge-disk (default: none)",
    )
    s.add_argument(
        "--closed-reads",
        action="store_true",
        help="reads need a token too (the printed KVCDN_TOKEN_FILE reads and publishes; agents get reader.token)",
    )
    s.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every port, from a test CA made in the store (prints the client's files to export)",
    )
    s.add_argument(
        "--sell",
        action="store_true",
        help="edges take grants for priced documents and ship every receipt at once to STORE/receipts (makes a "
        "grant issuer key and the edges' receipt keys in STORE/keys; prints them to export)",
    )
    ModelOptions.add_flags(s)
    s.set_defaults(run=up)

    s = sub.add_parser(
        "health",
        help="ask a server's gRPC health service (exit 0 when serving: probes, HEALTHCHECK) and the model it serves",
    )
    s.add_argument("address", help="HOST:PORT of an origin or an edge (its gRPC port)")
    s.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (3)")
    add_tls_flags(s, env=True)
    s.set_defaults(run=health)

    s = sub.add_parser("stats", help="a table of the edges' state (tiers, hit ratios, origin traffic)")
    add_edges_flag(s)
    add_connection_flags(s, trust=False)
    s.set_defaults(run=stats)

    s = sub.add_parser("demo", help="the main job on the embedded default model, with a table")
    s.add_argument("--max-new-tokens", type=int, default=24)
    ModelOptions.add_flags(s)
    s.set_defaults(run=demo)

    s = sub.add_parser("keys", help="publisher signing keys: make one, or show a key file's id")
    keys = s.add_subparsers(dest="keys_command", required=True, metavar="generate|show|grant|revoke")
    g = keys.add_parser("generate", help="a new Ed25519 publisher key: KEY (private, mode 0600) and KEY.pub")
    g.add_argument("key", help="where to write the private key, e.g. publisher.key (never overwritten)")
    g.add_argument(
        "--days",
        type=float,
        default=0,
        help="the key expires this many days from now (written into KEY.pub; default: never)",
    )
    g.set_defaults(run=keys_generate)
    k = keys.add_parser("show", help="the key id of a public (.pub) or private key file")
    k.add_argument("key")
    k.set_defaults(run=keys_show)
    gi = keys.add_parser("grant", help="issue a grant (a JWT) that lets an agent load priced documents; prints it")
    _add_issuer_key(gi)
    gi.add_argument(
        "--agent-key", required=True, type=Path, help="the agent's public key (.pub): the grant is bound to it"
    )
    gi.add_argument("--agent", required=True, help="the agent's account, charged in the ledger")
    gi.add_argument("--cap", required=True, type=int, help="the most the grant may be charged, smallest units")
    gi.add_argument("--asset", default="USDC", help="what the cap is in (USDC)")
    gi.add_argument("--publishers", default="", help="pay_to accounts it may pay (comma-separated; default any)")
    gi.add_argument("--documents", default="", help="document names it covers (comma-separated; default any)")
    gi.add_argument("--ttl", type=float, default=3600.0, help="seconds it is valid (3600)")
    gi.add_argument(
        "--id", default="", help="the grant's id, which receipts name and revocations use (default: random)"
    )
    gi.set_defaults(run=keys_grant)
    rv = keys.add_parser("revoke", help="revoke grants: a list the issuer signs, relayed to every edge by the origin")
    _add_issuer_key(rv)
    add_origin_flag(rv, "origin HOST:PORT that relays it in its invalidation feed (with a publisher token)")
    add_connection_flags(rv, trust=False)
    rv.add_argument("grant_ids", nargs="+", metavar="GRANT_ID", help="the grants' ids (their jti)")
    rv.set_defaults(run=keys_revoke)

    s = sub.add_parser("certs", help="a test CA with server and client certificates, for TLS trials")
    s.add_argument("--out", required=True, help="folder for ca.pem, server.pem/.key, client.pem/.key")
    s.add_argument("--hosts", default="127.0.0.1,localhost", help="names and IPs the servers are reached by")
    s.add_argument("--days", type=int, default=30, help="validity (30)")
    s.set_defaults(run=certs)

    s = sub.add_parser("provision", help="fetch and convert the embedded default model")
    s.add_argument("--models-dir", default=os.environ.get("KVCDN_MODELS_DIR"))
    s.set_defaults(run=provision)

    register_ledger(sub)


def up(args: argparse.Namespace) -> int:
    from kvcdn.ops.launcher import Cluster

    if args.edges < 1:
        raise InvalidArgument("--edges must be at least 1")
    with tempfile.TemporaryDirectory(prefix="kvcdn-store-") as tmp:
        store = Path(args.store) if args.store else Path(tmp)
        edge_args = ["--mem-bytes", str(args.mem_bytes)]
        if args.disk_bytes:
            edge_args += ["--disk-bytes", str(args.disk_bytes)]
        selling = _selling(store, args.edges) if args.sell else None
        if selling is not None:
            edge_args += ["--grant-issuers", str(selling.issuer.with_suffix(".pub")), "--receipt-batch", "1"]
        cluster = Cluster(
            store_dir=store,
            edges=args.edges,
            origin_args=ModelOptions.from_args(args).flags(),
            edge_args=edge_args,
            edge_disk_root=store / "edge-disk" if args.disk_bytes else None,
            auth=True,
            closed_reads=args.closed_reads,
            tls=args.tls,
            edge_args_by_index=selling.edge_args if selling is not None else {},
        )
        print("starting origin (loading the model) ...", file=sys.stderr, flush=True)
        with cluster:
            print(f"origin  {cluster.origin_address}  metrics {cluster.metrics_urls['origin']}  (store {store})")
            for i, addr in enumerate(cluster.edge_addresses):
                disk = f", disk {args.disk_bytes / 2**20:.0f} MiB" if args.disk_bytes else ""
                tiers = f"(memory {args.mem_bytes / 2**20:.0f} MiB{disk})"
                print(f"edge{i}   {addr}  metrics {cluster.metrics_urls[f'edge{i}']}  {tiers}")
            print(f"export KVCDN_ORIGIN={cluster.origin_address}")
            print(f"export KVCDN_EDGES={','.join(cluster.edge_addresses)}")
            print(f"export KVCDN_TRUST={cluster.trust_file}  # the publisher key clients require")
            print(f"export KVCDN_TOKEN_FILE={cluster.publisher_token_file}  # for publish and purge", flush=True)
            if cluster.client_tls is not None:  # mutual TLS: a client certificate of the test CA
                for name, path in (("CERT", cluster.client_tls.cert), ("KEY", cluster.client_tls.key)):
                    print(f"export KVCDN_TLS_{name}={path}")
                print(f"export KVCDN_TLS_CA={cluster.client_tls.ca}  # the CA the servers' certificates verify with")
            if args.closed_reads:
                print(f"# reads are closed: agents use --token-file {cluster.reader_token_file}")
            if selling is not None:
                print(f"export KVCDN_GRANT_ISSUER_KEY={selling.issuer}  # signs agents' grants: kvcdn keys grant")
                print(f"export KVCDN_RECEIPT_KEYS={selling.receipt_keys}  # the edges' receipt keys: kvcdn ledger")
                print(f"export KVCDN_RECEIPTS={store / 'receipts'}  # EDGE/outbox/batch-*.pb: kvcdn ledger ingest")
            print("# ready: Ctrl-C (or kill %1) stops them all", flush=True)
            stop = threading.Event()
            # Explicit handlers: a shell that starts `kvcdn up &` ignores SIGINT in it by default.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(0.5):
                pass
            print("stopping ...", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class _Selling:
    issuer: Path
    receipt_keys: str
    """The edges' receipt public keys, comma-separated."""
    edge_args: dict[int, list[str]]


def _selling(store: Path, edges: int) -> _Selling:
    """`kvcdn up --sell`: a grant issuer's key and a receipt key per edge (made once, in STORE/keys)."""
    from kvcdn.spec.provenance import generate_key

    keys = store / "keys"
    names = ["grant-issuer", *(f"edge{i}-receipts" for i in range(edges))]
    for name in names:
        if not (keys / f"{name}.key").exists():
            generate_key(keys / f"{name}.key")
    edge_args = {
        i: ["--receipt-key", str(keys / f"edge{i}-receipts.key"), "--receipts", str(store / "receipts" / f"edge{i}")]
        for i in range(edges)
    }
    pubs = ",".join(str(keys / f"{name}.pub") for name in names[1:])
    return _Selling(keys / "grant-issuer.key", pubs, edge_args)


def stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvcdn.ops.stats import edge_stats, stats_table
    from kvcdn.wire.auth import read_token
    from kvcdn.wire.tls import TLSFiles

    rows = asyncio.run(edge_stats(args.edges, token=read_token(args.token_file), tls=TLSFiles.from_args(args)))
    Console(width=None if sys.stdout.isatty() else 240).print(stats_table(rows))
    return 0 if all(r.up for r in rows) else 1


def demo(args: argparse.Namespace) -> int:
    from kvcdn.ops.demo import run_demo

    options = ModelOptions.from_args(args)
    return run_demo(options.load(), options, args.max_new_tokens)


def health(args: argparse.Namespace) -> int:
    from kvcdn.wire.stub import CacheReader
    from kvcdn.wire.tls import TLSFiles

    async def ask() -> str:
        async with CacheReader(args.address, timeout_s=args.timeout, tls=TLSFiles.from_args(args)) as reader:
            status = await reader.health()
            try:  # what it serves, for agents' configuration (vLLM's connector takes the fingerprint)
                info = await reader.info()
            except KVCDNError:  # reads closed to this caller: health is all it may know
                return status
            return f"{status}, model {info.model}, fingerprint {info.fingerprint}"

    answer = asyncio.run(ask())
    print(f"{args.address}: {answer}")
    return 0 if answer.startswith("SERVING") else 1


def provision(args: argparse.Namespace) -> int:
    from kvcdn.model.loading import default_models_dir, provision_default_model

    print(provision_default_model(Path(args.models_dir) if args.models_dir else default_models_dir()))
    return 0


def keys_generate(args: argparse.Namespace) -> int:
    from kvcdn.spec.provenance import generate_key

    public, key_id = generate_key(Path(args.key), args.days)
    print(f"wrote {args.key} (keep it on the origin: --signing-key)")
    print(f"and {public} (give it to clients and edges: --trust)")
    print(f"key id {key_id}" + (f", expires in {args.days:g} days" if args.days else ""))
    return 0


def keys_show(args: argparse.Namespace) -> int:
    from kvcdn.spec.provenance import Signer, TrustStore, utc_text

    path = Path(args.key)
    try:
        trust = TrustStore.from_files([path])
    except InvalidArgument:  # a private key (its expiry, if any, is in its .pub)
        print(Signer.from_file(path).key_id)
        return 0
    (key_id,) = trust.keys
    expires = trust.expires.get(key_id)
    state = "" if expires is None else f" expires {utc_text(expires)}" + ("" if trust.accepts(key_id) else " (EXPIRED)")
    print(key_id + state)
    return 0


def _add_issuer_key(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--issuer-key",
        type=Path,
        default=os.environ.get("KVCDN_GRANT_ISSUER_KEY"),
        help="the grant issuer's private key, whose .pub the edges trust (env KVCDN_GRANT_ISSUER_KEY)",
    )


def _issuer_key(args: argparse.Namespace) -> Any:
    """The grant issuer's private key of `--issuer-key`."""
    from kvcdn.spec.provenance import Signer

    if not args.issuer_key:
        raise InvalidArgument("--issuer-key names the grant issuer's private key (or set KVCDN_GRANT_ISSUER_KEY)")
    return Signer.from_file(args.issuer_key).key


def keys_grant(args: argparse.Namespace) -> int:
    from kvcdn.spec.grants import Scope, issue_grant
    from kvcdn.spec.provenance import TrustStore

    try:
        [agent_key] = TrustStore.from_files([args.agent_key]).keys.values()
    except InvalidArgument as exc:
        raise InvalidArgument(f"--agent-key: {exc}".replace("--trust ", "")) from None
    publishers, documents = (tuple(x for x in v.split(",") if x) for v in (args.publishers, args.documents))
    scope = Scope(publishers=publishers, documents=documents)
    print(issue_grant(_issuer_key(args), agent_key, args.agent, scope, args.cap, args.asset, args.ttl, args.id))
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from kvcdn.spec.grants import issue_revocation
    from kvcdn.wire.auth import read_token
    from kvcdn.wire.stub import CacheReader
    from kvcdn.wire.tls import TLSFiles

    revocation = issue_revocation(_issuer_key(args), args.grant_ids)

    async def relay() -> int:
        async with CacheReader(args.origin, token=read_token(args.token_file), tls=TLSFiles.from_args(args)) as origin:
            return await origin.revoke(revocation)

    seq = asyncio.run(relay())
    print(f"revoked {', '.join(args.grant_ids)}: invalidation event {seq}, on its way to every edge")
    return 0


def certs(args: argparse.Namespace) -> int:
    from kvcdn.wire.tls import make_test_ca

    files = make_test_ca(Path(args.out), [h.strip() for h in args.hosts.split(",") if h.strip()], args.days)
    for name, path in files.items():
        print(f"{name:11} {path}")
    print("servers: --tls-cert server.pem --tls-key server.key [--tls-ca ca.pem: require client certificates]")
    print("callers: --tls-ca ca.pem [--tls-cert client.pem --tls-key client.key]")
    return 0
