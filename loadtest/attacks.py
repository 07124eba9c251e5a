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
import struct
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.errors import KVCDNError
from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.loadtest.bench_report import grid
from kvcdn.loadtest.network import rss_mb
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.spec.identity import block_keys
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.auth import read_token

__all__ = ["AttackRow", "run_attacks", "still_open"]


@dataclass(frozen=True)
class AttackRow:
    attack: str
    fetch_ms: float
    """The honest agent's best fetch while the attack ran."""
    rss_mib: float
    """The edge's resident memory at the attack's height."""
    outcome: str


async def _fetch_ms(client: KVClient, model: LoadedModel, ids: list[int], n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fetched = await client.fetch(model, ids)
        assert fetched.cached_tokens == len(ids), "the honest fetch came back incomplete"
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


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


def _open(host: str, port: int, n: int, first: bytes) -> list[socket.socket]:
    """Up to `n` connections from ATTACKER that send `first` and then nothing (refused ones skipped)."""
    out = []
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=2, source_address=(ATTACKER, 0))
            s.sendall(first)
            out.append(s)
        except OSError:
            break
    return out


RANDOM_KEYS = 8
"""Random keys a stream of random keys names (an edge once looked each up at the origin on its own)."""


def _random_key_streams(host: str, port: int, fingerprint: str, n: int) -> Counter[str]:
    """`n` bulk streams from ATTACKER, one after another, each asking for RANDOM_KEYS random
    (unpublished) keys; the status each got, by name."""
    codes: Counter[str] = Counter()
    for _ in range(n):
        keys = [os.urandom(32) for _ in range(RANDOM_KEYS)]
        request = pb.StreamBlocksRequest(fingerprint=fingerprint, keys=keys).SerializeToString()
        with socket.create_connection((host, port), timeout=5, source_address=(ATTACKER, 0)) as s:
            s.sendall(struct.pack("<I", len(request)) + request)
            head = s.recv(8, socket.MSG_WAITALL)
            marker, length = struct.unpack("<II", head) if len(head) == 8 else (0, 0)
            if marker != 0xFFFFFFFE or length < 4:  # not an error record (kvcdn.wire.bulk)
                codes["other"] += 1
                continue
            (code,) = struct.unpack("<I", s.recv(4, socket.MSG_WAITALL))
            codes[next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")] += 1
    return codes


def _origin_lookups(metrics_url: str) -> float:
    """LookupPrefix calls the origin has answered (its /metrics)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_method") == "LookupPrefix"
    )


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


def run_attacks(model: LoadedModel, options: ModelOptions, markdown: bool) -> int:
    """Start an origin and an edge (signed, tokens on, a per-client rate limit), run each attack, print
    the table."""
    with tempfile.TemporaryDirectory(prefix="kvcdn-attacks-") as store:
        cluster = Cluster(
            store_dir=Path(store),
            edges=1,
            origin_args=[*options.flags(), "--rate-limit", str(ORIGIN_RATE_LIMIT)],
            edge_args=["--rate-limit", str(EDGE_RATE_LIMIT)],
            auth=True,
        ).start()
        try:
            rows = asyncio.run(_attacks(model, cluster))
        finally:
            cluster.stop()
    body = [[r.attack, f"{r.fetch_ms:.0f}", f"{r.rss_mib:.0f}", r.outcome] for r in rows]
    out = grid(
        ["attack (bounded, loopback)", "honest fetch ms", "edge RSS MiB", "outcome"],
        body,
        f"kvcdn attacks: {model.name}, one edge (--rate-limit {EDGE_RATE_LIMIT}), signed blocks, tokens on",
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
    text = text_of_length(model, "Attack document.\n\n" + sample_corpus(), 1024)
    ids = document_ids(model.tokenizer, text)
    token = read_token(cluster.publisher_token_file)
    async with CacheReader(cluster.origin_address, token=token) as publisher:
        manifest = (await publisher.publish("attacked", text)).manifest
    trust = (cluster.trust_file,) if cluster.trust_file is not None else ()
    rows: list[AttackRow] = []
    async with KVClient(ClientConfig((edge,), trust=trust)) as client, CacheReader(edge) as reader:
        bulk_port = (await reader.info()).bulk_port
        metrics_port = int(cluster.metrics_urls["edge0"].rsplit(":", 1)[1].split("/")[0])
        await _fetch_ms(client, model, ids)  # warm
        rows.append(AttackRow("none (baseline)", await _fetch_ms(client, model, ids), rss_mb(edge_pid), "-"))

        async def during(name: str, attack: Callable[[], Coroutine[Any, Any, str]]) -> None:
            task: asyncio.Task[str] = asyncio.create_task(attack())
            await asyncio.sleep(0.3)
            fetch_ms = await _fetch_ms(client, model, ids)
            rss = rss_mb(edge_pid)
            rows.append(AttackRow(name, fetch_ms, rss, await task))

        async def slow_loris() -> str:
            socks = await asyncio.to_thread(_open, host, bulk_port, 400, struct.pack("<I", 1 << 20))
            await asyncio.sleep(0.5)
            held = await asyncio.to_thread(still_open, socks)
            await asyncio.sleep(10.5)  # the bulk port's request deadline is 10 s
            left = await asyncio.to_thread(still_open, socks)
            for s in socks:
                s.close()
            return f"the edge held {held} of {len(socks)} (512 per peer), {left} after 11 s"

        async def non_readers() -> str:
            request = pb.StreamBlocksRequest(
                fingerprint=model.fingerprint_hex, keys=[b.key for b in manifest.blocks]
            ).SerializeToString()
            socks = await asyncio.to_thread(_open, host, bulk_port, 16, struct.pack("<I", len(request)) + request)
            await asyncio.sleep(3)
            for s in socks:
                s.close()
            return f"{len(socks)} stalled 3 s, then closed by the attacker (the edge drops one stalled 60 s)"

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
                async with CacheReader(cluster.origin_address, token=token) as p:
                    await p.publish("huge", "word " * ((8 << 20) // 5))
            except KVCDNError as exc:
                return f"{type(exc).__name__} in {(time.perf_counter() - t0) * 1e3:.0f} ms, before tokenizing"
            return "ACCEPTED"

        async def anonymous_purge() -> str:
            try:
                async with CacheReader(cluster.origin_address) as anonymous:
                    await anonymous.purge("attacked")
            except KVCDNError as exc:
                return f"{type(exc).__name__}; the document is still served"
            return "PURGED"

        async def token_guessing() -> str:
            codes: Counter[str] = Counter()
            t0 = time.perf_counter()
            for _ in range(GUESSES):
                try:
                    async with CacheReader(cluster.origin_address, token=secrets.token_hex(16)) as guesser:
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
            codes = await asyncio.to_thread(_random_key_streams, host, bulk_port, model.fingerprint_hex, RANDOM_STREAMS)
            seconds = time.perf_counter() - t0
            lookups = _origin_lookups(cluster.metrics_urls["origin"]) - before
            refused, missing = codes.pop("RESOURCE_EXHAUSTED", 0), codes.pop("NOT_FOUND", 0)
            other = f", other: {dict(codes)}" if codes else ""
            per_stream = lookups / max(1, missing)
            return (
                f"in {seconds:.1f} s: {refused} refused by --rate-limit {EDGE_RATE_LIMIT}, {missing} NOT_FOUND; "
                f"the origin answered {lookups:.0f} lookups ({per_stream:.2f} a stream answered){other}"
            )

        async def half_open_scrapes() -> str:
            socks = await asyncio.to_thread(_open, host, metrics_port, 100, b"GET /metr")
            await asyncio.sleep(0.5)
            held = await asyncio.to_thread(still_open, socks)
            await asyncio.sleep(10.5)  # scrapes get 10 s to send their request
            left = await asyncio.to_thread(still_open, socks)
            for s in socks:
                s.close()
            return f"{held} half-open scrapes held, {left} after 11 s"

        await during("slow-loris on the bulk port (400 conns, 1 MiB announced)", slow_loris)
        await during("16 bulk readers that never read", non_readers)
        await during("one request naming a key 4,096 times", repeated_keys)
        await during("an 8 MiB Publish", huge_publish)
        await during("anonymous Purge", anonymous_purge)
        await during("100 half-open /metrics requests", half_open_scrapes)
        await during(f"{GUESSES} guessed publisher tokens (Purge at the origin) from one address", token_guessing)
        await during(f"{RANDOM_STREAMS:,} bulk streams of {RANDOM_KEYS} random keys each from one address", random_keys)
    return rows
