"""Flag types and flag groups that several components' commands share (each component registers its
own commands; see kvcdn.cli). Cheap to import: argparse and nothing heavy."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

__all__ = [
    "add_connection_flags",
    "add_edges_flag",
    "add_origin_flag",
    "add_server_flags",
    "add_tls_flags",
    "edge_list",
    "parse_count",
    "parse_size",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmg]?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1048576' -> bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower().removesuffix("b") if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512MiB, 2GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_count(text: str) -> float:
    """'80M', '1.5k', '2e6', '1000' -> a number."""
    m = _COUNT.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 80M, 1.5k or 2e6")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]


def edge_list(text: str) -> list[str]:
    """'h:1,h:2=3' -> ['h:1', 'h:2=3'] (checked later by kvcdn.spec.placement.parse_edges)."""
    edges = [e.strip() for e in text.split(",") if e.strip()]
    if not edges:
        raise argparse.ArgumentTypeError("give at least one edge address HOST:PORT")
    return edges


def add_edges_flag(p: argparse.ArgumentParser) -> None:
    """`--edges`, defaulting to $KVCDN_EDGES (which `kvcdn up` prints)."""
    p.add_argument(
        "--edges",
        type=edge_list,
        default=os.environ.get("KVCDN_EDGES"),
        required="KVCDN_EDGES" not in os.environ,
        help="edge addresses HOST:PORT[,...], or @FILE of them, one a line: a file or a DNS name is followed "
        "while the command runs (env KVCDN_EDGES)",
    )


def add_origin_flag(p: argparse.ArgumentParser, help_text: str = "origin HOST:PORT") -> None:
    """`--origin`, defaulting to $KVCDN_ORIGIN (which `kvcdn up` prints)."""
    p.add_argument(
        "--origin",
        default=os.environ.get("KVCDN_ORIGIN"),
        required="KVCDN_ORIGIN" not in os.environ,
        help=f"{help_text} (env KVCDN_ORIGIN)",
    )


TRUST_ENV = "KVCDN_TRUST"


def trust_list(text: str) -> tuple[Path, ...]:
    """'a.pub,b.pub' -> the files (read, and checked to be Ed25519 keys, by kvcdn.spec.provenance)."""
    return tuple(Path(p.strip()) for p in text.split(",") if p.strip())


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    """`--trust`, defaulting to $KVCDN_TRUST (which `kvcdn up` prints): the publisher keys whose
    signatures are required on every block and manifest (none: nothing is checked)."""
    p.add_argument(
        "--trust",
        type=trust_list,
        default=trust_list(os.environ.get(TRUST_ENV, "")),
        metavar="KEY.pub[,...]",
        help="require blocks signed by these publisher keys (env KVCDN_TRUST; default: no signature checks)",
    )


def add_token_flag(p: argparse.ArgumentParser) -> None:
    """`--token-file`, defaulting to $KVCDN_TOKEN_FILE (which `kvcdn up` prints): the token a server
    started with `--tokens` requires (publisher: Publish, Purge; reader: reads where they are closed)."""
    default = os.environ.get("KVCDN_TOKEN_FILE")
    p.add_argument(
        "--token-file",
        type=Path,
        default=Path(default) if default else None,
        help="file holding this caller's token (env KVCDN_TOKEN_FILE): a publisher token to publish and purge "
        "where the origin has --tokens, any token to read where reads are closed",
    )


def add_connection_flags(p: argparse.ArgumentParser, trust: bool = True) -> None:
    """What every command that calls an existing network takes, each flag with the environment
    default `kvcdn up` prints: `--token-file`, the TLS files, and (with `trust`, for the commands
    that receive caches or manifests) `--trust`."""
    add_token_flag(p)
    if trust:
        add_trust_flag(p)
    add_tls_flags(p, env=True)


def add_tls_flags(p: argparse.ArgumentParser, env: bool = False) -> None:
    """`--tls-cert`, `--tls-key`, `--tls-ca` (`kvcdn certs` makes a test set; read by
    kvcdn.wire.tls.TLSFiles.from_args); with `env` (a caller's commands, never a server's) each
    defaults to $KVCDN_TLS_CERT, _KEY, _CA."""

    def flag(name: str, help_text: str) -> None:
        variable = f"KVCDN_TLS_{name.upper()}"
        value = os.environ.get(variable) if env else None
        hint = f" (env {variable})" if env else ""
        p.add_argument(f"--tls-{name}", type=Path, default=Path(value) if value else None, help=help_text + hint)

    flag("cert", "this party's certificate chain (PEM): serve, or call with mTLS")
    flag("key", "the key of --tls-cert (PEM)")
    flag("ca", "CA (PEM) to verify the other side with; on a server it also requires callers' certificates")


def add_server_flags(p: argparse.ArgumentParser, listen: str) -> None:
    """What every server command takes: where it listens, its bulk and metrics ports, a per-client
    rate limit, and the port file a parent process (`kvcdn up`) waits for."""
    p.add_argument("--listen", default=listen, help=f"HOST:PORT (port 0: any free port; default {listen})")
    p.add_argument(
        "--bulk-port",
        type=int,
        default=0,
        help="TCP port of the bulk frame stream on the listen host (0: any free port, -1: off)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="HTTP port of the Prometheus /metrics endpoint on the listen host (0: any free port, -1: off)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="CALLS_PER_S",
        help="calls (and bulk streams) a second per client, by token or else address, in bursts of 2 s "
        "worth; callers with an edge or publisher token are not limited (default 0: no limit)",
    )
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.set_defaults(server=True)
