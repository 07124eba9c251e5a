"""TLS for kvcdn's ports: certificates from files, mutual TLS when a server names a client CA, and
`kvcdn certs`, a helper that makes a test CA with server and client certificates.

One deployment CA is the simple case: every server presents a certificate it signed, every caller
verifies against it, and with `--tls-ca` on a server callers must present one too (mTLS: edges to
the origin and to their peers, agents to edges). The same files secure the gRPC port (grpcio's
credentials) and the bulk frame stream (Python's `ssl` contexts, same certificates, same client-
certificate rule). Plaintext stays the default, for loopback.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvcdn.errors import InvalidArgument

__all__ = ["TLSFiles", "make_test_ca"]


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one party: its certificate chain and key (a server's identity; a caller's for
    mTLS) and the CA it verifies the other side with."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TLSFiles | None:
        """The files the flags name (kvcdn.flags.add_tls_flags), or None (plaintext) when none is given."""
        files = cls(args.tls_cert, args.tls_key, args.tls_ca)
        return files if any((files.cert, files.key, files.ca)) else None

    def server_credentials(self) -> grpc.ServerCredentials:
        """A server's credentials; with a CA, callers must present a certificate it signed (mTLS)."""
        if self.cert is None or self.key is None:
            raise InvalidArgument("a TLS server needs --tls-cert and --tls-key")
        chain = _read(self.cert, "--tls-cert")
        key = _read(self.key, "--tls-key")
        assert chain is not None and key is not None
        ca = _read(self.ca, "--tls-ca")
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A caller's credentials: verify the server against the CA, present its own certificate if it has one."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--tls-ca"),
            private_key=_read(self.key, "--tls-key"),
            certificate_chain=_read(self.cert, "--tls-cert"),
        )

    def server_context(self) -> ssl.SSLContext:
        """The bulk port's TLS context: the same certificate, and with a CA the same rule (callers
        present a certificate it signed)."""
        if self.cert is None or self.key is None:
            raise InvalidArgument("a TLS server needs --tls-cert and --tls-key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load(ctx, self.cert, self.key)
        if self.ca is not None:
            _verify_with(ctx, self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A bulk caller's TLS context: verify the server (and its host name) against the CA, or the
        system's roots without one; present this party's certificate if it has one."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            _verify_with(ctx, self.ca)
        if self.cert is not None and self.key is not None:
            _load(ctx, self.cert, self.key)
        return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"--tls-cert {cert} / --tls-key {key}: {exc}") from None


def _verify_with(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"--tls-ca {ca}: {exc}") from None


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def make_test_ca(folder: Path, hosts: list[str], days: int = 30) -> dict[str, Path]:
    """A CA and, signed by it, a server certificate for `hosts` (names or IP addresses) and a client
    certificate, in `folder`: ca.pem, server.pem/.key, client.pem/.key. For tests and trials; a real
    deployment uses its own PKI."""
    if not hosts:
        raise InvalidArgument("name at least one host the servers are reached by (--hosts 127.0.0.1,localhost)")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("kvcdn test CA"))
        .issuer_name(_name("kvcdn test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": folder / "ca.pem"}
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    # Servers call each other too (edges to the origin and to peers), so theirs serves both ends.
    usages = {
        "server": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }
    for role, usage in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"kvcdn {role}"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        out[role] = folder / f"{role}.pem"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = folder / f"{role}.key"
        _write_key(out[f"{role}_key"], key)
    return out
