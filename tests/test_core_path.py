"""The core path: publish at the origin, relay through an edge, rebuild and continue exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcdn import adapter
from kvcdn.client import KVClient, generate_from_cache
from kvcdn.models import LoadedModel
from kvcdn.prompt import document_ids, question_ids
from tests.conftest import SAMPLES, Network, start_network, stop_network

NEW_TOKENS = 24


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
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
