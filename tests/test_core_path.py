"""The core path: publish at the origin, relay through an edge, rebuild and continue exactly."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from kvcdn.client import BlockingKVClient, CacheReader, KVClient, generate_from_cache
from kvcdn.client.agent import ask
from kvcdn.edge import Edge, EdgeConfig, serve_edge
from kvcdn.edge.buffers import BlockBuffers
from kvcdn.edge.pulls import Pull, PullTarget
from kvcdn.edge.tiers import MemoryTier
from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids, question_ids
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import digest
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import encode_frame
from tests.conftest import SAMPLES, Network, memory_tier, start_network, stop_network
from tests.tinymodels import ARCHITECTURES, WINDOW

NEW_TOKENS = 24


@pytest.mark.parametrize("arch", ARCHITECTURES)
async def test_fetched_cache_continues_exactly_like_local_prefill(
    arch: str, tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    model = tiny_models[arch]
    net = await start_network(model, tmp_path / "store")
    try:
        text = (SAMPLES / "mpl-2.0.txt").read_text()[:2500]
        await net.origin.publish("mpl", text)
        doc = document_ids(model.tokenizer, text)
        ids = doc + question_ids(model.tokenizer, "Who is the steward?")
        async with KVClient([net.edge_address]) as client:
            fetched = await client.fetch(model, doc)
        assert fetched.cached_tokens == len(doc)
        assert fetched.n_bytes == len(doc) * model.geometry.token_bytes
        cached = generate_from_cache(model, fetched, ids, NEW_TOKENS)
        local = adapter.greedy(model.model, ids, NEW_TOKENS)
        assert len(local.tokens) == NEW_TOKENS
        assert cached.tokens == local.tokens
        diff = max(float((a - b).abs().max()) for a, b in zip(cached.logits, local.logits, strict=True))
        assert diff <= 1e-3
    finally:
        await stop_network(net)


async def test_fetched_layers_equal_origin_prefill_bit_for_bit(network: Network, sample_text: str) -> None:
    model = network.model
    await network.origin.publish("apache", sample_text)
    doc = document_ids(model.tokenizer, sample_text)
    async with KVClient([network.edge_address]) as client:
        fetched = await client.fetch(model, doc)
    reference = adapter.prefill(model.model, doc)
    for (k, v), (rk, rv) in zip(fetched.layers, reference, strict=True):
        assert torch.equal(k, rk)
        assert torch.equal(v, rv)
    # The DynamicCache handed to generate() holds the same tensors and is reusable.
    cache = fetched.cache(model)
    assert cache.get_seq_length() == len(doc)


async def test_publishing_the_same_text_twice_computes_nothing_new(network: Network, sample_text: str) -> None:
    first = await network.origin.publish("apache", sample_text)
    again = await network.origin.publish("apache", sample_text)
    assert first.computed_blocks == len(first.manifest.blocks) > 1
    assert again.computed_blocks == 0 and again.prefill_s == 0.0
    assert again.manifest == first.manifest and again.manifest.version == 1
    assert network.origin.prefill_runs == 1


async def test_concurrent_publishes_of_one_text_prefill_once(network: Network, sample_text: str) -> None:
    results = await asyncio.gather(*(network.origin.publish("apache", sample_text) for _ in range(5)))
    assert network.origin.prefill_runs == 1
    assert {r.manifest.version for r in results} == {1}
    assert sum(r.computed_blocks for r in results) == 5 * len(results[0].manifest.blocks)


async def test_changed_content_gets_a_new_version_and_old_versions_stay(network: Network, sample_text: str) -> None:
    v1 = (await network.origin.publish("doc", sample_text)).manifest
    v2 = (await network.origin.publish("doc", sample_text + " Amended.")).manifest
    assert (v1.version, v2.version) == (1, 2)
    async with CacheReader(network.edge_address) as edge:
        assert (await edge.manifest("doc")).version == 2
        assert (await edge.manifest("doc", 1)).content_digest == v1.content_digest


async def test_shared_prefix_is_reused_by_publisher_and_client(network: Network, sample_text: str) -> None:
    model = network.model
    other = sample_text[:1500] + " A different ending that changes the later blocks entirely."
    await network.origin.publish("a", sample_text)
    doc_b = document_ids(model.tokenizer, other)
    shared = 0
    doc_a = document_ids(model.tokenizer, sample_text)
    while doc_a[shared] == doc_b[shared]:
        shared += 1
    full_blocks = shared // model.geometry.block_tokens
    assert full_blocks >= 2
    # Before B is published, the longest cached prefix of B is A's shared blocks.
    async with KVClient([network.edge_address]) as client:
        partial = await client.fetch(model, doc_b)
        assert partial.cached_tokens == full_blocks * model.geometry.block_tokens
        # Continuing from the partial cache prefills only the rest, and still matches local prefill.
        ids = doc_b + question_ids(model.tokenizer, "What changed?")
        cached = generate_from_cache(model, partial, ids, NEW_TOKENS)
        assert cached.tokens == adapter.greedy(model.model, ids, NEW_TOKENS).tokens
        # Publishing B computes only the blocks after the shared prefix.
        result = await network.origin.publish("b", other)
        assert result.computed_blocks == len(result.manifest.blocks) - full_blocks
        assert (await client.fetch(model, doc_b)).cached_tokens == len(doc_b)


async def test_edge_pulls_each_block_from_the_origin_once(network: Network, sample_text: str) -> None:
    model = network.model
    manifest = (await network.origin.publish("apache", sample_text)).manifest
    doc = document_ids(model.tokenizer, sample_text)
    clients = [KVClient([network.edge_address]) for _ in range(8)]
    try:
        fetched = await asyncio.gather(*(c.fetch(model, doc) for c in clients))
    finally:
        for c in clients:
            await c.close()
    assert all(f.cached_tokens == len(doc) for f in fetched)
    assert network.edge.origin_fetches == len(manifest.blocks)
    async with KVClient([network.edge_address]) as client:
        await client.fetch(model, doc)
    assert network.edge.origin_fetches == len(manifest.blocks)
    assert memory_tier(network.edge).hits >= len(manifest.blocks)


async def test_nothing_cached_yields_an_empty_fetch_and_generation_prefills_locally(network: Network) -> None:
    model = network.model
    doc = document_ids(model.tokenizer, "never published text")
    async with KVClient([network.edge_address]) as client:
        fetched = await client.fetch(model, doc)
    assert fetched.cached_tokens == 0 and fetched.layers == []
    ids = doc + question_ids(model.tokenizer, "?")
    assert generate_from_cache(model, fetched, ids, 4).tokens == adapter.greedy(model.model, ids, 4).tokens


def test_blocking_client_fetches_without_an_event_loop(llama: LoadedModel, tmp_path: Path) -> None:
    async def setup() -> Network:
        net = await start_network(llama, tmp_path / "store")
        await net.origin.publish("x", (SAMPLES / "gpl-2.0.txt").read_text()[:1200])
        return net

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    net = asyncio.run_coroutine_threadsafe(setup(), loop).result(60)
    try:
        doc = document_ids(llama.tokenizer, (SAMPLES / "gpl-2.0.txt").read_text()[:1200])
        with BlockingKVClient([net.edge_address]) as client:
            assert client.info().role == "edge"
            assert client.fetch(llama, doc).cached_tokens == len(doc)
    finally:
        asyncio.run_coroutine_threadsafe(stop_network(net), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("bulk_pulls", [True, False])
async def test_a_cold_edge_pulls_blocks_ahead_of_the_stream(
    network: Network, sample_text: str, bulk_pulls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = network.model
    manifest = (await network.origin.publish("apache", sample_text)).manifest
    assert len(manifest.blocks) >= 3
    running = peak = 0
    serve = network.origin.stream

    async def counting(fingerprint: str, keys: Sequence[bytes], start_frame: int = 0) -> AsyncIterator[bytes]:
        """The origin's block streams, counting how many are open at once (over either transport)."""
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.01)  # let the edge's stream ask for more while this pull is in flight
            async for raw in serve(fingerprint, keys, start_frame):
                yield raw
        finally:
            running -= 1

    monkeypatch.setattr(network.origin, "stream", counting)
    config = EdgeConfig(origin=network.origin_server.address, listen="127.0.0.1:0", bulk_pulls=bulk_pulls)
    edge = Edge(config, CacheReader(config.origin), [MemoryTier(config.mem_bytes)])
    server = await serve_edge(edge)
    try:
        doc = document_ids(model.tokenizer, sample_text)
        async with KVClient([server.address]) as client:
            fetched = await client.fetch(model, doc)
        assert fetched.cached_tokens == len(doc)
        assert peak > 1 and edge.origin_fetches == len(manifest.blocks)
        assert edge.bytes_from_origin == sum(b.n_bytes for b in manifest.blocks)
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(model.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        await server.stop(0)
        await edge.close()


@pytest.mark.parametrize("arch", ["mistral-window", "gemma2", "gemma3"])
def test_sliding_window_layers_are_stored_whole_and_rebuilt_as_the_model_keeps_them(
    arch: str, tiny_models: dict[str, LoadedModel]
) -> None:
    model = tiny_models[arch]
    doc = document_ids(model.tokenizer, (SAMPLES / "gpl-2.0.txt").read_text()[:800])
    assert len(doc) > 4 * WINDOW
    layers = adapter.prefill(model.model, doc)
    assert all(k.shape[2] == v.shape[2] == len(doc) for k, v in layers)  # every token, for the wire
    cache = adapter.build_cache(model.model, layers)
    kinds = [layer.is_sliding for layer in cache.layers]
    assert any(kinds) and (all(kinds) if arch == "mistral-window" else not all(kinds))  # the Gemmas: hybrid
    for layer, (k, _) in zip(cache.layers, layers, strict=True):
        kept = layer.keys.shape[2]
        assert kept == (WINDOW - 1 if layer.is_sliding else len(doc))
        assert torch.equal(layer.keys, k[:, :, len(doc) - kept :])
    assert cache.get_seq_length() == len(doc)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
async def test_ask_verify_reports_what_exactness_means_when_the_origin_prefilled_in_pieces(
    arch: str, tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    """The origin prefills a document whose prefix it already stored in pieces (the stored prefix as
    past, then the rest). Here, in float32 on a CPU, that is bit-identical to one pass for Llama and not
    for Gemma 2 (differences ~5e-6): `ask --verify` says which, (a), instead of calling it exact."""
    model = tiny_models[arch]
    text = (SAMPLES / "mpl-2.0.txt").read_text()[:2500]
    net = await start_network(model, tmp_path / "store")
    try:
        prefix = document_ids(model.tokenizer, text)[: 2 * model.geometry.block_tokens]
        await net.origin.publish("prefix", model.tokenizer.decode(prefix))
        computed = (await net.origin.publish("whole", text)).computed_blocks
        doc = document_ids(model.tokenizer, text)
        assert 0 < computed < -(-len(doc) // model.geometry.block_tokens), "the stored prefix was reused"
        async with KVClient([net.edge_address]) as client:
            result = await ask(client, model, text, "Who is the steward?", NEW_TOKENS, verify=True, policy="fetch")
            fetched = await client.fetch(model, doc)
        own = adapter.prefill(model.model, doc)
        pairs = zip(fetched.layers, own, strict=True)
        identical = all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in pairs)
        assert result.kv_bit_identical is identical and result.cached_tokens == len(doc)
        if identical:
            assert result.two_pass_matched_tokens == result.new_tokens == NEW_TOKENS
        assert result.matched_tokens is not None and result.max_abs_logit_diff is not None
        assert result.max_abs_logit_diff <= 1e-3  # (c), a statistic: tiny in float32 either way
    finally:
        await stop_network(net)


def test_cache_layers_kvcdn_cannot_rebuild_are_refused_naming_the_model_type(
    tiny_models: dict[str, LoadedModel],
) -> None:
    model = tiny_models["llama"].model

    class RecurrentState:  # what a state-space or linear-attention layer keeps instead of keys and values
        is_sliding = False

    with pytest.raises(InvalidArgument, match="llama models are not supported: cache layer 1 is a RecurrentState"):
        adapter.check_layers(model, SimpleNamespace(layers=[DynamicLayer(), RecurrentState()]))


async def test_an_edge_load_receives_each_frame_in_place_byte_identical_to_the_encoded_frame() -> None:
    # The receiver writes payloads straight into the block's buffer the edge then serves (leased
    # unzeroed from the pool): once settled, each frame must be exactly the Frame message the origin
    # encodes, and the block's frames one buffer.
    payload = bytes(range(256)) * 40  # frames of 4,096 bytes: 3, the last one short
    chunks = [payload[at : at + 4096] for at in range(0, len(payload), 4096)]
    info = pb.BlockInfo(key=b"k" * 32, n_tokens=40, n_bytes=len(payload), frame_digests=[digest(c) for c in chunks])
    geometry = Geometry(layers=2, kv_heads=2, head_dim=8, dtype="float32", block_tokens=40, frame_bytes=4096)
    buffers = BlockBuffers(1 << 20)
    pull = Pull(seen_before=False, from_peers=False)
    target = PullTarget(info, geometry, pull, asyncio.get_running_loop(), buffers)
    for i, chunk in enumerate(chunks):
        [region] = target.regions(0, 40, i * 4096, len(chunk))
        region[:] = np.frombuffer(chunk, dtype=np.uint8)
        target.frame_done(0, 40, i * 4096 + len(chunk))
        assert target.payload_bytes == i * 4096 + len(chunk)
    await asyncio.sleep(0)  # the pull hears of each frame on the loop
    encoded = [encode_frame(info, i, 4096, chunk) for i, chunk in enumerate(chunks)]
    assert [bytes(f) for f in target.frames] == [bytes(f) for f in pull.frames] == encoded
    assert len({id(memoryview(f).obj) for f in target.frames}) == 1
    assert (buffers.leased_from_pool, buffers.allocated) == (1, 0)
    with pytest.raises(DigestMismatch, match="a frame of 100 bytes where the block's info says 4096"):
        target.regions(0, 40, 0, 100)
