"""Cut-through at the edge: requests for a block that is still arriving from the origin get each frame
as soon as it has arrived and passed its digest; a reader that hangs up does not stop the load for the
others; a block purged while it loads is served to those waiting but kept in no tier."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from kvcdn.client import KVClient
from kvcdn.errors import NotFound
from kvcdn.model.prompt import document_ids
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import decode_frame
from tests.conftest import Network, memory_tier


def _gate_origin(network: Network) -> asyncio.Event:
    """Make the origin hold back everything after each block's first frame until the returned event is
    set (on whichever transport the edge loads over)."""
    gate = asyncio.Event()
    real = network.origin.stream

    async def gated(fingerprint: str, keys: Sequence[bytes], start_frame: int = 0) -> AsyncIterator[bytes]:
        async for raw in real(fingerprint, keys, start_frame):
            if decode_frame(raw)[0].frame_index > 0:
                await gate.wait()
            yield raw

    network.origin.stream = gated  # type: ignore[method-assign]
    return gate


async def _publish_multi_frame_block(network: Network, sample_text: str) -> tuple[str, pb.BlockInfo]:
    manifest = (await network.origin.publish("apache", sample_text)).manifest
    first = manifest.blocks[0]
    assert len(first.frame_digests) > 1
    return network.model.fingerprint_hex, first


async def test_readers_get_the_first_frame_while_the_rest_of_the_block_is_still_arriving(
    network: Network, sample_text: str
) -> None:
    fingerprint, info = await _publish_multi_frame_block(network, sample_text)
    gate = _gate_origin(network)
    readers = [network.edge.stream(fingerprint, [info.key], 0) for _ in range(3)]
    # The origin has sent frame 0 only; every reader gets it now, not when the block is complete.
    firsts = await asyncio.wait_for(asyncio.gather(*(anext(r) for r in readers)), 10)
    assert all(decode_frame(f)[0].frame_index == 0 for f in firsts)
    assert network.edge.origin_fetches == 0 and memory_tier(network.edge).stats().blocks == 0
    gate.set()
    for reader in readers:
        rest = [f async for f in reader]
        assert len(rest) == len(info.frame_digests) - 1
    assert network.edge.origin_fetches == 1  # one pull served all three
    assert info.key in memory_tier(network.edge)


async def test_a_reader_that_hangs_up_does_not_stop_the_load_for_the_others(network: Network, sample_text: str) -> None:
    fingerprint, info = await _publish_multi_frame_block(network, sample_text)
    gate = _gate_origin(network)
    leaver = network.edge.stream(fingerprint, [info.key], 0)
    stayer = network.edge.stream(fingerprint, [info.key], 0)
    await asyncio.wait_for(anext(leaver), 10)
    await leaver.aclose()  # the client that started the pull disconnects
    gate.set()
    frames = [f async for f in stayer]
    assert len(frames) == len(info.frame_digests)
    assert network.edge.origin_fetches == 1 and info.key in memory_tier(network.edge)


async def test_a_block_purged_while_it_loads_is_not_kept(network: Network, sample_text: str) -> None:
    fingerprint, info = await _publish_multi_frame_block(network, sample_text)
    gate = _gate_origin(network)
    reader = network.edge.stream(fingerprint, [info.key], 0)
    await asyncio.wait_for(anext(reader), 10)
    network.edge.invalidate(pb.InvalidationEvent(seq=1, keys=[info.key]))
    gate.set()
    assert len([f async for f in reader]) == len(info.frame_digests) - 1  # asked before the purge
    assert info.key not in memory_tier(network.edge)


async def test_a_start_frame_past_the_block_is_refused_while_it_loads(network: Network, sample_text: str) -> None:
    fingerprint, info = await _publish_multi_frame_block(network, sample_text)
    _gate_origin(network).set()
    with pytest.raises(Exception, match="past the"):
        async for _ in network.edge.stream(fingerprint, [info.key], len(info.frame_digests)):
            pass


async def test_cold_fetch_through_a_cut_through_edge_is_exact(network: Network, sample_text: str) -> None:
    await network.origin.publish("apache", sample_text)
    doc = document_ids(network.model.tokenizer, sample_text)
    async with KVClient([network.edge_address]) as cold, KVClient([network.edge_address]) as warm:
        a, b = await asyncio.gather(cold.fetch(network.model, doc), warm.fetch(network.model, doc))
    assert a.cached_tokens == b.cached_tokens == len(doc)
    for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True):
        assert ka.equal(kb) and va.equal(vb)


async def test_streams_the_edge_saw_no_lookup_for_ask_the_origin_once_for_all_their_blocks(
    network: Network, sample_text: str
) -> None:
    # Streams from peers, or from clients that looked up at another edge: the edge knows none of the
    # blocks. It used to ask the origin for each block's info as it pulled it, once per block.
    manifest = (await network.origin.publish("apache", sample_text)).manifest
    keys = [b.key for b in manifest.blocks]
    assert len(keys) >= 3
    real = network.edge.upstream.lookup
    asked: list[int] = []

    async def counted(fingerprint: str, looked_up: Sequence[bytes], *args: object) -> list[pb.BlockInfo]:
        asked.append(len(looked_up))
        return await real(fingerprint, looked_up, *args)  # type: ignore[arg-type]

    network.edge.upstream.lookup = counted  # type: ignore[method-assign]

    async def frames(stream: AsyncIterator[bytes]) -> int:
        return len([raw async for raw in stream])

    herd = [network.edge.stream(network.model.fingerprint_hex, keys, 0) for _ in range(3)]
    got = await asyncio.wait_for(asyncio.gather(*(frames(s) for s in herd)), 30)
    assert got == [sum(len(b.frame_digests) for b in manifest.blocks)] * 3
    assert asked == [len(keys)]  # one origin lookup for every block of the three streams
    # A key the origin does not hold: the stream's lookup says so, and the block's pull does not ask again.
    asked.clear()
    with pytest.raises(NotFound):
        await frames(network.edge.stream(network.model.fingerprint_hex, [bytes(32)], 0))
    assert asked == [1]
