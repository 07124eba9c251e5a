"""Per-client rate limits: a token bucket per reader token (or per address without one), on gRPC and
the bulk port alike; callers with an edge or publisher token are not limited; one client over its
rate is refused (RESOURCE_EXHAUSTED, with the time to wait) while others are served."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader
from kvcdn.errors import InvalidArgument, LimitExceeded, Unauthenticated
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.model.receiving import KVAssembler
from kvcdn.origin import OriginConfig
from kvcdn.wire.auth import Authorizer
from kvcdn.wire.ratelimit import RateLimiter, caller, check_call, peer_host
from kvcdn.wire.receiver import Progress, receive_into
from tests.conftest import SAMPLES, start_network, stop_network

TEXT = (SAMPLES / "mpl-2.0.txt").read_text()[:1500]
TOKENS = {role: role[0] * 32 for role in ("publisher", "edge")} | {"reader": "r" * 32, "reader2": "s" * 32}


def _tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("".join(f"{role.rstrip('2')} {token}\n" for role, token in TOKENS.items()))
    return path


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    limiter = RateLimiter(rate=20, burst=2)
    limiter.admit(caller("10.0.0.1", "", None), "LookupPrefix")
    limiter.admit(caller("10.0.0.1", "", None), "LookupPrefix")
    with pytest.raises(LimitExceeded, match=r"LookupPrefix: peer 10.0.0.1 is over its rate of 20 calls/s .* retry in"):
        limiter.admit(caller("10.0.0.1", "", None), "LookupPrefix")
    limiter.admit(caller("10.0.0.2", "", None), "LookupPrefix")  # another client: its own bucket
    time.sleep(0.06)  # one call's worth (0.05 s at 20/s) refilled
    limiter.admit(caller("10.0.0.1", "", None), "LookupPrefix")
    with pytest.raises(LimitExceeded):
        limiter.admit(caller("10.0.0.1", "", None), "LookupPrefix")


def test_clients_are_their_tokens_and_the_deployments_own_roles_are_not_limited(tmp_path: Path) -> None:
    auth = Authorizer.from_file(_tokens_file(tmp_path))
    limiter = RateLimiter(rate=0.001, burst=1)
    for _ in range(50):  # edges and publishers are the deployment's own
        limiter.admit(caller("10.0.0.1", TOKENS["edge"], auth), "LookupPrefix")
        limiter.admit(caller("10.0.0.1", TOKENS["publisher"], auth), "Publish")
    limiter.admit(caller("10.0.0.1", TOKENS["reader"], auth), "GetManifest")
    with pytest.raises(LimitExceeded, match="reader token"):  # the same party from another address
        limiter.admit(caller("10.0.0.9", TOKENS["reader"], auth), "GetManifest")
    limiter.admit(caller("10.0.0.1", TOKENS["reader2"], auth), "GetManifest")  # another reader
    limiter.admit(caller("10.0.0.1", "u" * 32, auth), "GetManifest")  # an unknown token counts as its address
    with pytest.raises(LimitExceeded, match=r"peer 10\.0\.0\.1"):
        limiter.admit(caller("10.0.0.1", "v" * 32, auth), "GetManifest")  # a new made-up token gets no new bucket


def test_forgotten_clients_are_bounded() -> None:
    limiter = RateLimiter(rate=0.001, burst=1, max_clients=3)
    for host in ("a", "b", "c", "d"):
        limiter.admit(caller(host, "", None), "GetInfo")
    limiter.admit(caller("a", "", None), "GetInfo")  # "a" was dropped (least recently seen): a full burst again
    with pytest.raises(LimitExceeded):
        limiter.admit(caller("d", "", None), "GetInfo")


def test_peer_hosts_and_bad_rates() -> None:
    assert peer_host("ipv4:127.0.0.2:50123") == "127.0.0.2"
    assert peer_host("ipv6:[::1]:50123") == "::1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
    with pytest.raises(InvalidArgument, match="above 0"):
        RateLimiter(rate=0)
    with pytest.raises(InvalidArgument, match="rate-limit"):
        OriginConfig(store_dir=Path("/nonexistent"), rate_limit=-1)


async def test_an_origin_limits_each_reader_on_grpc_and_bulk_and_serves_the_others(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(
        llama, tmp_path / "store", tokens=_tokens_file(tmp_path), edge_token=TOKENS["edge"], rate_limit=1
    )
    origin = net.origin_server.address
    try:
        async with CacheReader(origin, token=TOKENS["publisher"]) as publisher:
            manifest = (await publisher.publish("doc", TEXT)).manifest
            for _ in range(5):
                await publisher.manifest("doc")
        fingerprint, doc = llama.fingerprint_hex, document_ids(llama.tokenizer, TEXT)
        async with CacheReader(origin, token=TOKENS["reader"]) as reader:
            await reader.manifest("doc")  # the burst: 2 calls at 1/s
            await reader.lookup(fingerprint, [b.key for b in manifest.blocks])
            with pytest.raises(LimitExceeded, match=r"GetManifest: reader token .* over its rate of 1 calls/s"):
                await reader.manifest("doc")
            # The bulk port counts a stream as a call, under the same bucket.
            assembler = KVAssembler(llama.geometry, len(doc), torch.device("cpu"))
            address = ("127.0.0.1", net.origin_server.bulk_port)
            args = (fingerprint, manifest.blocks, llama.geometry, assembler, Progress(), 5.0, None)
            with pytest.raises(LimitExceeded, match="StreamBlocks: reader token"):
                await asyncio.to_thread(receive_into, address, *args, TOKENS["reader"])
        async with CacheReader(origin, token=TOKENS["reader2"]) as other:  # another reader is served
            assert (await other.manifest("doc")).version == 1
            progress = Progress()
            assembler = KVAssembler(llama.geometry, len(doc), torch.device("cpu"))
            args = (fingerprint, manifest.blocks, llama.geometry, assembler, progress, 5.0, None)
            await asyncio.to_thread(receive_into, address, *args, TOKENS["reader2"])
            assert progress.block == len(manifest.blocks)
        async with CacheReader(net.edge_address) as agent:  # the edge reads with its edge token: unlimited
            assert len(await agent.lookup(fingerprint, [b.key for b in manifest.blocks])) == len(manifest.blocks)
        refused = net.origin_server.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_type": "unary",
                "grpc_service": "kvcdn.v1.KVCache",
                "grpc_method": "GetManifest",
                "grpc_code": "RESOURCE_EXHAUSTED",
            },
        )
        assert refused == 1
    finally:
        await stop_network(net)


def test_failed_authentications_take_from_the_callers_rate_and_are_logged_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A token guesser got 1,567 answers a second under --rate-limit 10: its failed calls were refused
    # before the rate was counted. Now each guess takes a unit of its address's bucket.
    auth = Authorizer.from_file(_tokens_file(tmp_path), closed_reads=True)
    limiter = RateLimiter(rate=0.001, burst=3)
    outcomes = []
    with caplog.at_level(logging.WARNING, logger="kvcdn.wire.auth"):
        for i in range(50):
            try:
                check_call(auth, limiter, "10.0.0.7", f"guess-{i:026d}", "GetManifest")
            except (Unauthenticated, LimitExceeded) as exc:
                outcomes.append(type(exc).__name__)
    assert outcomes == ["Unauthenticated"] * 3 + ["LimitExceeded"] * 47  # 3 guesses, then nothing learnt
    assert auth.refused == 3
    check_call(auth, limiter, "10.0.0.8", TOKENS["reader"], "GetManifest")  # an honest reader is served
    warnings = [r.getMessage() for r in caplog.records if "credentials" in r.getMessage()]
    assert len(warnings) == 1 and "(1 since the last report)" in warnings[0]  # one line, not one per guess
