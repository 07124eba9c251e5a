"""`kvcdn loadtest attacks`: the attacks of the trust review, each bounded and run on loopback against a
real origin and edge (processes), while an honest agent keeps fetching: the table prints the agent's
fetch time and the edge's resident memory during each attack beside the quiet baseline, and what the
attacker got. Every attack is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import struct
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.errors import DigestMismatch, KVCDNError
from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.loadtest.bench_report import grid
from kvcdn.loadtest.network import MiB, rss_mb
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.spec.identity import block_keys
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import read_token
from kvcdn.wire.bulk import Trailers
from kvcdn.wire.metrics import ServerMetrics
from kvcdn.wire.readside import ReadService
from kvcdn.wire.rpc import start_server

__all__ = ["AttackRow", "run_attacks", "still_open"]


@dataclass(frozen=True)
class AttackRow:
    attack: str
    fetch_ms: tuple[float, float]
    """The honest agent's best and worst of 3 fetches while the attack ran (the first may wait on it)."""
    rss_mib: float
    """The edge's resident memory at the attack's height."""
    outcome: str


async def _fetch_ms(client: KVClient, model: LoadedModel, ids: list[int], n: int = 3) -> tuple[float, float]:
    """The best and the worst of `n` fetches of `ids`, in milliseconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fetched = await client.fetch(model, ids)
        assert fetched.cached_tokens == len(ids), "the honest fetch came back incomplete"
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), max(times)


RANDOM_STREAMS = 1000
EDGE_RATE_LIMIT = 100
ORIGIN_RATE_LIMIT = 10
"""The origin's --rate-limit here (its edges and publishers, the deployment's own, are not limited)."""
GUESSES = 300
"""Publisher tokens guessed, one Purge each, from one address."""
"""Calls a second per client the edge allows (`--rate-limit`): the honest agent needs a few per fetch."""
ATTACKER = "127.0.0.2"
"""The attacker's source address: another peer than the honest agent (Linux routes all of 127/8 to
loopback), as it would be on a network; per-peer caps tell them apart."""


def _open(host: str, port: int, n: int, first: bytes, tls: ssl.SSLContext | None = None) -> list[socket.socket]:
    """Up to `n` connections from ATTACKER that send `first` and then nothing (refused ones skipped);
    with `tls`, each after a TLS handshake with that context's certificate (an insider's), else raw
    TCP (on a TLS port: a handshake that never starts)."""
    out = []
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=2, source_address=(ATTACKER, 0))
            if tls is not None:
                s = tls.wrap_socket(s, server_hostname=host)
            s.sendall(first)
            out.append(s)
        except OSError:
            break
    return out


RANDOM_KEYS = 8
"""Random keys a stream of random keys names (an edge once looked each up at the origin on its own)."""


def _recv_exact(s: socket.socket, n: int) -> bytes:
    """Up to `n` bytes, fewer only if the server closes first (an SSL socket takes no MSG_WAITALL)."""
    data = b""
    while len(data) < n and (chunk := s.recv(n - len(data))):
        data += chunk
    return data


def _random_key_streams(host: str, port: int, fingerprint: str, n: int, tls: ssl.SSLContext | None) -> Counter[str]:
    """`n` bulk streams from ATTACKER, one after another, each asking for RANDOM_KEYS random
    (unpublished) keys; the status each got, by name."""
    codes: Counter[str] = Counter()
    for _ in range(n):
        keys = [os.urandom(32) for _ in range(RANDOM_KEYS)]
        request = pb.StreamBlocksRequest(fingerprint=fingerprint, keys=keys).SerializeToString()
        raw = socket.create_connection((host, port), timeout=5, source_address=(ATTACKER, 0))
        with tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw as s:
            s.sendall(struct.pack("<I", len(request)) + request)
            head = _recv_exact(s, 8)
            marker, length = struct.unpack("<II", head) if len(head) == 8 else (0, 0)
            if marker != 0xFFFFFFFE or length < 4:  # not an error record (kvcdn.wire.bulk)
                codes["other"] += 1
                continue
            (code,) = struct.unpack("<I", _recv_exact(s, 4))
            codes[next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")] += 1
    return codes


def _metric(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` (with `labels`) a server's /metrics shows now."""
    with urllib.request.urlopen(metrics_url, timeout=5) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _origin_lookups(metrics_url: str) -> float:
    """LookupPrefix calls the origin has answered (its /metrics)."""
    return _metric(metrics_url, "grpc_server_handled_total", grpc_method="LookupPrefix")


def still_open(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has not closed: what it sent is read and dropped (a gRPC server
    sends its SETTINGS, a bulk server an error record), then EOF or an error means it ended the
    connection, and nothing more to read means it still holds it."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(1 << 16):
                pass
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


class _Forger:
    """An edge that forges manifests from the honest ones it gets (the forgeries the trust review made
    of signed manifests): `mode` says which. It serves everything else as the honest edge does."""

    def __init__(self, upstream: CacheReader) -> None:
        self.upstream = upstream
        self.mode = ""

    async def info(self) -> pb.ServerInfo:
        return await self.upstream.info()

    async def manifest(self, document: str, version: int, token_ids: bool = False) -> pb.Manifest:
        if self.mode == "another document":
            document = "attacked"
        elif self.mode == "an older version":
            version = 1
        manifest = await self.upstream.manifest(document, version, token_ids)
        if self.mode == "reversed token ids":
            manifest.token_ids.reverse()
        return manifest

    async def lookup(
        self, fingerprint: str, keys: Sequence[bytes], codecs: Sequence[str] = (), from_peer: bool = False
    ) -> list[pb.BlockInfo]:
        return await self.upstream.lookup(fingerprint, keys, codecs, from_peer)

    def stream(
        self,
        fingerprint: str,
        keys: Sequence[bytes],
        start_frame: int,
        from_peer: bool = False,
        load: pb.Load | None = None,
        trailers: Trailers | None = None,
    ) -> AsyncIterator[bytes]:
        return self.upstream.stream(fingerprint, keys, start_frame, from_peer, load)


FORGED_FETCHES = 20
"""Manifests asked of the forging edge, per forgery."""
PINNED = "64MiB"
"""The edge's --pinned-bytes here (its --mem-bytes is as large: the tier holds 5 of the 16 blocks)."""


def run_attacks(model: LoadedModel, options: ModelOptions, markdown: bool) -> int:
    """Start an origin and an edge as deploy/README.md recommends (mutual TLS on every port, tokens,
    signed blocks, --trust, per-client rate limits), run each attack, print the table."""
    with tempfile.TemporaryDirectory(prefix="kvcdn-attacks-") as store:
        cluster = Cluster(
            store_dir=Path(store),
            edges=1,
            origin_args=[*options.flags(), "--rate-limit", str(ORIGIN_RATE_LIMIT)],
            edge_args=["--rate-limit", str(EDGE_RATE_LIMIT), "--mem-bytes", PINNED, "--pinned-bytes", PINNED],
            auth=True,
            tls=True,
        ).start()
        try:
            rows = asyncio.run(_attacks(model, cluster))
            rows.append(asyncio.run(_corrupt_manifest(model, cluster)))
        finally:
            cluster.stop()
    body = [[r.attack, "{:.0f} / {:.0f}".format(*r.fetch_ms), f"{r.rss_mib:.0f}", r.outcome] for r in rows]
    out = grid(
        ["attack (bounded, loopback)", "honest fetch ms, best / worst of 3", "edge RSS MiB", "outcome"],
        body,
        f"kvcdn attacks: {model.name}, one edge (mTLS, tokens, signed blocks and --trust, --rate-limit "
        f"{EDGE_RATE_LIMIT}, --mem-bytes and --pinned-bytes {PINNED}); the attacker is {ATTACKER}",
        markdown,
    )
    if isinstance(out, str):
        print(out)
    else:
        from rich.console import Console

        Console(width=200).print(out)
    return 0


async def _attacks(model: LoadedModel, cluster: Cluster) -> list[AttackRow]:
    edge = cluster.edge_addresses[0]
    host = edge.rpartition(":")[0]
    edge_pid = cluster.process("edge0").pid
    corpus = "Attack document.\n\n" + sample_corpus()
    text = text_of_length(model, corpus, 1024)
    ids = document_ids(model.tokenizer, text)
    token = read_token(cluster.publisher_token_file)
    tls = cluster.client_tls
    insider = tls.client_context() if tls is not None else None
    """The attackers that get past mTLS hold a client certificate (a compromised agent)."""
    async with CacheReader(cluster.origin_address, token=token, tls=tls) as publisher:
        manifest = (await publisher.publish("attacked", text)).manifest
        await publisher.publish("attacked", text + " Version two.")
        others = [text_of_length(model, f"Document {i}.\n\n" + corpus[i * 997 :], 1024) for i in range(3)]
        manifests = [manifest, *[(await publisher.publish(f"other{i}", t)).manifest for i, t in enumerate(others)]]
    trust = (cluster.trust_file,) if cluster.trust_file is not None else ()
    rows: list[AttackRow] = []
    config = ClientConfig((edge,), trust=trust, tls=tls)
    async with KVClient(config) as client, CacheReader(edge, tls=tls) as reader:
        bulk_port = (await reader.info()).bulk_port
        metrics_port = int(cluster.metrics_urls["edge0"].rsplit(":", 1)[1].split("/")[0])
        for t in others:  # the tier fills (to its --mem-bytes) before the baseline
            await client.fetch(model, document_ids(model.tokenizer, t))
        await _fetch_ms(client, model, ids)  # warm
        baseline_ms = await _fetch_ms(client, model, ids)
        await asyncio.sleep(1.5)  # the edge gives the heap its fetches freed back (kvcdn.tuning)
        rows.append(AttackRow("none (baseline)", baseline_ms, rss_mb(edge_pid), "-"))

        async def during(name: str, attack: Callable[[], Coroutine[Any, Any, str]]) -> None:
            task: asyncio.Task[str] = asyncio.create_task(attack())
            await asyncio.sleep(0.3)
            fetch_ms = await _fetch_ms(client, model, ids)
            rss = rss_mb(edge_pid)
            rows.append(AttackRow(name, fetch_ms, rss, await task))

        async def held_then_gone(port: int, n: int, first: bytes, wait_s: float) -> str:
            socks = await asyncio.to_thread(_open, host, port, n, first)
            await asyncio.sleep(0.5)
            held = await asyncio.to_thread(still_open, socks)
            await asyncio.sleep(wait_s)
            left = await asyncio.to_thread(still_open, socks)
            for s in socks:
                s.close()
            return f"{held} of {len(socks)} held, {left} after {wait_s + 0.5:.0f} s"

        async def pending_tls() -> str:  # no certificate needed: the handshake never starts
            return await held_then_gone(bulk_port, 400, b"", 10.5) + " (16 in their handshake at a time)"

        async def half_open_grpc() -> str:
            port = int(edge.rpartition(":")[2])
            return await held_then_gone(port, 300, b"", 10.5) + " (handshake deadline 10 s; cap: 1/4 of the fd limit)"

        async def half_open_scrapes() -> str:
            return await held_then_gone(metrics_port, 100, b"GET /metr", 10.5) + " (4 answering, 16 waiting)"

        async def non_readers() -> str:
            def request(m: pb.Manifest) -> bytes:
                keys = [b.key for b in m.blocks]
                body = pb.StreamBlocksRequest(fingerprint=model.fingerprint_hex, keys=keys).SerializeToString()
                return struct.pack("<I", len(body)) + body

            socks = []
            for i in range(16):
                socks += await asyncio.to_thread(_open, host, bulk_port, 1, request(manifests[i % 4]), insider)
            url = cluster.metrics_urls["edge0"]
            peak = 0.0
            for _ in range(30):
                await asyncio.sleep(0.2)
                peak = max(peak, await asyncio.to_thread(_metric, url, "kvcdn_edge_pinned_bytes"))
            cut = await asyncio.to_thread(_metric, url, "kvcdn_edge_stalled_streams_cut_total")
            for s in socks:
                s.close()
            return (
                f"{len(socks)} stalled 6 s, then closed by the attacker; the streams held at most "
                f"{peak / MiB:.0f} MiB of blocks (--pinned-bytes {PINNED}), {cut:.0f} cut to make room"
            )

        async def repeated_keys() -> str:
            key = block_keys(model.fingerprint, ids, model.geometry.block_tokens)[0]
            t0 = time.perf_counter()
            try:
                async for _ in reader.stream(model.fingerprint_hex, [key] * 4096):
                    pass
            except KVCDNError as exc:
                return f"{type(exc).__name__} in {(time.perf_counter() - t0) * 1e3:.0f} ms, no byte sent"
            return "SERVED"

        async def huge_publish() -> str:
            t0 = time.perf_counter()
            try:
                async with CacheReader(cluster.origin_address, token=token, tls=tls) as p:
                    await p.publish("huge", "word " * ((8 << 20) // 5))
            except KVCDNError as exc:
                return f"{type(exc).__name__} in {(time.perf_counter() - t0) * 1e3:.0f} ms, before tokenizing"
            return "ACCEPTED"

        async def anonymous_purge() -> str:
            try:
                async with CacheReader(cluster.origin_address, tls=tls) as anonymous:
                    await anonymous.purge("attacked")
            except KVCDNError as exc:
                return f"{type(exc).__name__}; the document is still served"
            return "PURGED"

        async def token_guessing() -> str:
            codes: Counter[str] = Counter()
            t0 = time.perf_counter()
            for _ in range(GUESSES):
                try:
                    async with CacheReader(cluster.origin_address, token=secrets.token_hex(16), tls=tls) as guesser:
                        await guesser.purge("attacked")
                    codes["OK"] += 1
                except KVCDNError as exc:
                    codes[exc.code.name] += 1
            seconds = time.perf_counter() - t0
            answered = codes.pop("UNAUTHENTICATED", 0)
            refused = codes.pop("RESOURCE_EXHAUSTED", 0)
            other = f", other: {dict(codes)}" if codes else ""
            return (
                f"in {seconds:.1f} s: {answered} answered UNAUTHENTICATED (a burst of {2 * ORIGIN_RATE_LIMIT}, then "
                f"{ORIGIN_RATE_LIMIT}/s), {refused} refused by the origin's --rate-limit {ORIGIN_RATE_LIMIT}{other}"
            )

        async def random_keys() -> str:
            before = _origin_lookups(cluster.metrics_urls["origin"])
            t0 = time.perf_counter()
            codes = await asyncio.to_thread(
                _random_key_streams, host, bulk_port, model.fingerprint_hex, RANDOM_STREAMS, insider
            )
            seconds = time.perf_counter() - t0
            lookups = _origin_lookups(cluster.metrics_urls["origin"]) - before
            refused, missing = codes.pop("RESOURCE_EXHAUSTED", 0), codes.pop("NOT_FOUND", 0)
            other = f", other: {dict(codes)}" if codes else ""
            per_stream = lookups / max(1, missing)
            return (
                f"in {seconds:.1f} s: {refused} refused by --rate-limit {EDGE_RATE_LIMIT}, {missing} NOT_FOUND; "
                f"the origin answered {lookups:.0f} lookups ({per_stream:.2f} a stream answered){other}"
            )

        async def forged_manifests() -> str:
            forger = _Forger(reader)
            server = await start_server("127.0.0.1:0", ReadService(forger, ServerMetrics()))
            refused: Counter[str] = Counter()
            try:
                async with KVClient(ClientConfig((server.address,), trust=trust)) as victim:
                    for mode, version in (("reversed token ids", 0), ("another document", 0), ("an older version", 2)):
                        forger.mode = mode
                        for _ in range(FORGED_FETCHES):
                            try:
                                name = "other0" if mode == "another document" else "attacked"
                                await victim.manifest(name, version, token_ids=True)
                            except DigestMismatch:
                                refused[mode] += 1
            finally:
                await server.stop(0)
            kinds = ", ".join(f"{m}: {n}" for m, n in refused.items())
            return f"refused {sum(refused.values())} of {3 * FORGED_FETCHES} ({kinds})"

        await during("400 connections that never start their TLS handshake (bulk port)", pending_tls)
        await during("300 connections that never finish their handshake (gRPC port)", half_open_grpc)
        await during(
            f"16 bulk readers (with a certificate) that never read, over {len(manifests)} documents", non_readers
        )
        await during("one request naming a key 4,096 times", repeated_keys)
        await during("an 8 MiB Publish", huge_publish)
        await during("anonymous Purge", anonymous_purge)
        await during("100 half-open /metrics requests", half_open_scrapes)
        await during(f"{GUESSES} guessed publisher tokens (Purge at the origin) from one address", token_guessing)
        await during(f"{RANDOM_STREAMS:,} bulk streams of {RANDOM_KEYS} random keys each from one address", random_keys)
        await during(f"manifests forged by an edge, {FORGED_FETCHES} of each of 3 kinds, signed", forged_manifests)
    return rows


async def _corrupt_manifest(model: LoadedModel, cluster: Cluster) -> AttackRow:
    """One flipped byte in a manifest file at the origin, which is then restarted: it starts, serves
    every other document, answers DATA_LOSS for the damaged version, and a publish repairs it."""
    await asyncio.to_thread(cluster.stop)
    victim = next((cluster.store_dir / "manifests").glob("*/1.manifest"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    await asyncio.to_thread(cluster.start)
    tls = cluster.client_tls
    edge = cluster.edge_addresses[0]
    trust = (cluster.trust_file,) if cluster.trust_file is not None else ()
    outcome = []
    async with KVClient(ClientConfig((edge,), trust=trust, tls=tls)) as client:
        for document in ("attacked", "other0", "other1", "other2"):
            try:
                await client.manifest(document)
            except DigestMismatch:
                outcome.append(f"{document}: DATA_LOSS")
        served = 4 - len(outcome)
        text = text_of_length(model, "Attack document.\n\n" + sample_corpus(), 1024)
        ids = document_ids(model.tokenizer, text)
        fetch_ms = await _fetch_ms(client, model, ids)
    return AttackRow(
        "one flipped bit in a manifest file, origin restarted",
        fetch_ms,
        rss_mb(cluster.process("edge0").pid),
        f"the origin started; {served} of 4 documents served, {'; '.join(outcome) or 'none damaged'}",
    )
