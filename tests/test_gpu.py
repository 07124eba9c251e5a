"""The GPU path, where CUDA exists (skipped elsewhere): caches land on the device through pinned,
reused staging buffers, block by block, bit-identical to the agent's own prefill on that device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvcdn.client import KVClient, api, generate_from_cache
from kvcdn.client.agent import compare
from kvcdn.model import adapter
from kvcdn.model.codecs import decode, encode
from kvcdn.model.loading import load_model
from kvcdn.model.prompt import document_ids, question_ids
from kvcdn.model.tensors import bit_identical
from kvcdn.spec.geometry import Geometry
from tests.conftest import SAMPLES, start_network, stop_network

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
async def test_a_fetched_cache_on_the_gpu_is_bit_identical_to_a_local_prefill(
    tiny_dirs: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    model = load_model(str(tiny_dirs["llama"]), dtype=dtype, device="cuda", block_tokens=32, frame_bytes=4096)
    text = (SAMPLES / "apache-2.0.txt").read_text()[:3000]
    doc = document_ids(model.tokenizer, text)
    net = await start_network(model, tmp_path / "store", max_document_tokens=4000)
    try:
        await net.origin.publish("doc", text)
        async with KVClient([net.edge_address]) as client:
            fetches = [await client.fetch(model, doc) for _ in range(3)]
            staging = client.staging
        fetched = fetches[-1]
        assert fetched.cached_tokens == len(doc) and fetched.layers[0][0].device.type == "cuda"
        assert staging is not None and staging.allocations == 1  # pinned once, reused by every fetch
        reference = adapter.prefill(model.model, doc)
        for (k, v), (rk, rv) in zip(fetched.layers, reference, strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)  # (a) bit-identical KV on the device
        ids = doc + question_ids(model.tokenizer, "Who may use this?")
        cached = generate_from_cache(model, fetched, ids, 16)
        two_pass = adapter.greedy(model.model, ids, 16, cache=reference)
        assert cached.tokens == two_pass.tokens  # (b) the agent's own two-pass run, token for token
        matched, diff = compare(cached, adapter.greedy(model.model, ids, 16))  # (c) one pass: a statistic
        # bf16: one pass and two passes are other arithmetic, so a token may differ; the logits (|6.5|
        # at most) still agree within 16 bf16 steps (0.5; on a CPU: 0.0, float32 1.4e-6). float32: every token.
        assert math.isfinite(diff) and diff < (0.5 if dtype == "bfloat16" else 1e-3)
        assert matched == 16 or dtype == "bfloat16"
    finally:
        await stop_network(net)


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
async def test_lossy_blocks_decode_on_the_gpu_as_on_the_host(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    model = load_model(str(tiny_dirs["llama"]), dtype="bfloat16", device="cuda", block_tokens=32, frame_bytes=4096)
    text = (SAMPLES / "apache-2.0.txt").read_text()[:3000]
    doc = document_ids(model.tokenizer, text)
    net = await start_network(model, tmp_path / "store", codecs=(codec,), max_document_tokens=4000)
    try:
        await net.origin.publish("doc", text)
        async with KVClient([net.edge_address]) as client:
            on_gpu = await client.fetch(model, doc, codecs=(codec,))  # copied encoded, decoded by torch on the GPU
            again = await client.fetch(model, doc, codecs=(codec,))
            monkeypatch.setattr(api, "decodes_on_device", lambda _codec, _device: False)
            on_host = await client.fetch(model, doc, codecs=(codec,))  # decoded on the CPU, copied decoded
        assert on_gpu.codec == codec and on_gpu.cached_tokens == len(doc)
        assert on_gpu.layers[0][0].device.type == "cuda"
        assert bit_identical(again.layers, on_gpu.layers)  # the same device decodes alike every time
        for (k, v), (hk, hv) in zip(on_gpu.layers, on_host.layers, strict=True):  # each rotates back by a
            for got, want in ((k, hk), (v, hv)):  # matrix product, whose summation order may differ
                assert got.device == want.device  # decoded on the host, the cache still lands on the GPU
                torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    finally:
        await stop_network(net)


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_lossy_encoders_on_the_gpu_encode_as_well_as_on_the_cpu(codec: str) -> None:
    # An origin on a GPU encodes there (its CPU would take seconds a codec for a large cache); the
    # format is the same and the error against the exact block no larger than the CPU encoder's.
    g = Geometry(layers=4, kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=256)
    torch.manual_seed(0)
    exact = torch.randn(2 * g.layers, 256, g.kv_heads, g.head_dim).to(torch.bfloat16)
    payload = exact.contiguous().view(torch.uint8).numpy().tobytes()
    errors = []
    for device in ("cpu", "cuda"):
        data = encode(codec, g, 256, payload, first=True, device=torch.device(device))
        back = torch.from_numpy(decode(codec, g, 256, data).copy()).view(torch.bfloat16).view(exact.shape)
        errors.append(float((back.float() - exact.float()).abs().mean()))
    cpu_error, gpu_error = errors
    assert 0 < gpu_error <= 1.05 * cpu_error
