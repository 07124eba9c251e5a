"""KV codecs: round trips per codec and dtype, sizes, hostile encodings, and negotiation between a
publisher's offer and a client's accept list over a real origin and edge."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from kvcdn.client import CacheReader, ClientConfig, KVClient
from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.model import adapter, codecs
from kvcdn.model.codecs import decode, encode, fp8, int4, lossless, rotation, rotation_block
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.model.receiving import DecodingAssembler, KVAssembler
from kvcdn.model.staging import StagingPool
from kvcdn.model.tensors import TORCH_DTYPES, LayerKV, bit_identical
from kvcdn.spec.codecs import (
    CHUNKED,
    CODECS,
    GROUPED,
    HEADER_BYTES,
    ROTATED,
    SINK,
    TOKEN_SCALED,
    fixed_body_bytes,
    max_encoded_bytes,
    parse_codecs,
)
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import encoded_key
from kvcdn.v1 import kvcdn_pb2 as pb
from tests.conftest import SAMPLES, memory_tier, start_network, stop_network

TEXT = (SAMPLES / "apache-2.0.txt").read_text()[:2500]


def _kv(geometry: Geometry, n_tokens: int, seed: int = 0) -> tuple[bytes, torch.Tensor]:
    """A block payload shaped like real KV: unit-scale values, a few outlier channels, a sink token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * geometry.layers, n_tokens, geometry.kv_heads, geometry.head_dim, generator=g)
    x[0::2, :, :, :3] *= 20  # keys: outlier channels (why keys are quantized per channel)
    x[1::2, 0] *= 8  # values: a large first token
    wire = x.to(TORCH_DTYPES[geometry.dtype])
    return wire.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), wire.float()


def _values(geometry: Geometry, data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.copy()).view(TORCH_DTYPES[geometry.dtype]).float()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n_tokens", [32, 7])  # a full block and a short last one
def test_every_codec_round_trips_each_dtype(dtype: str, n_tokens: int) -> None:
    g = Geometry(layers=3, kv_heads=2, head_dim=16, dtype=dtype, block_tokens=32)
    payload, reference = _kv(g, n_tokens)
    for (name, codec), first in itertools.product(CODECS.items(), (False, True)):  # a document's first block or not
        data = encode(name, g, n_tokens, payload, first=first)
        assert 0 < len(data) <= max_encoded_bytes(name, g, n_tokens)
        out = decode(name, g, n_tokens, data)
        assert out.dtype == np.uint8 and out.size == g.block_bytes(n_tokens)
        if codec.exact:
            assert out.tobytes() == payload  # bit for bit
            continue
        got = _values(g, out).reshape(reference.shape)
        relative = float((got - reference).norm() / reference.norm())
        assert relative < {"fp8": 0.03, "int8": 0.008, "int4": 0.12}[name], (name, relative)
        flags = int.from_bytes(data[6:8], "little")
        sunk = SINK if first else 0
        expected = {"fp8": ROTATED | TOKEN_SCALED | sunk, "int4": ROTATED | GROUPED | sunk}.get(name, 0)
        assert flags == expected, (name, flags)
        assert len(data) == HEADER_BYTES + fixed_body_bytes(name, g, n_tokens, flags)  # fixed-size encodings


def test_lossy_codecs_meet_their_ratios_against_bf16_on_a_real_geometry() -> None:
    g = Geometry(layers=30, kv_heads=3, head_dim=64, dtype="bfloat16")  # SmolLM2-135M
    payload, _ = _kv(g, 256)
    ratio = {name: len(payload) / len(encode(name, g, 256, payload)) for name in CODECS}
    assert ratio["raw"] == 1.0 and ratio["fp8"] >= 1.95 and ratio["int8"] >= 1.95 and ratio["int4"] >= 3.5
    # a 1,024-token document: its first block also carries the sink token exact
    fp8 = sum(len(encode("fp8", g, 256, payload, first=i == 0)) for i in range(4))
    assert 4 * len(payload) / fp8 >= 1.95
    assert ratio["lossless"] > 1.1  # random normal data; real KV (kvcdn loadtest codecs): ~1.45


def _mutations(data: bytes) -> dict[str, bytes]:
    return {
        "truncated by one byte": data[:-1],
        "header only": data[:12],
        "empty": b"",
        "one byte too many": data + b"\0",
        "another codec's id": data[:4] + bytes([data[4] ^ 3]) + data[5:],
        "another token count": data[:8] + (int.from_bytes(data[8:12], "little") + 1).to_bytes(4, "little") + data[12:],
        "unknown header flags": data[:6] + (0x8000).to_bytes(2, "little") + data[8:],
        "garbage": bytes(range(256)) * (len(data) // 256 + 1),
    }


@pytest.mark.parametrize("codec", ["lossless", "fp8", "int8", "int4"])
def test_a_corrupted_or_truncated_encoding_is_data_loss_never_a_crash(codec: str) -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=32)
    payload, _ = _kv(g, 32)
    data = encode(codec, g, 32, payload)
    cases = _mutations(data)
    if codec == "lossless":  # a flipped bit inside the compressed plane (zstd's checksum catches it)
        cases["flipped compressed byte"] = data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:]
    if codec == "fp8":  # codes that are NaN in e4m3
        cases["NaN codes"] = data[: len(data) // 2] + b"\x7f" * (len(data) - len(data) // 2)
    if codec != "lossless":  # the first layer's key scales (fp8: per-head bases; int4: minimums) infinite
        n = g.kv_heads if codec == "fp8" else g.kv_heads * g.head_dim
        cases["infinite scales"] = data[:12] + struct.pack("<f", float("inf")) * n + data[12 + 4 * n :]
    for what, bad in cases.items():
        with pytest.raises(DigestMismatch):
            decode(codec, g, 32, bad)
            raise AssertionError(f"{codec}: {what} decoded")


def _per_channel_fp8(g: Geometry, n_tokens: int, values: torch.Tensor, rotated: bool) -> bytes:
    """fp8 as encoded before TOKEN_SCALED existed (header flags 0, or ROTATED): per segment a float32
    scale per (head, channel) and the e4m3 codes of the values (rotated or not)."""
    flags = ROTATED if rotated else 0
    parts = [b"KVC1" + bytes([CODECS["fp8"].id, g.element_bytes]) + struct.pack("<HI", flags, n_tokens)]
    for x in values:  # per segment, [T, H, D]
        if rotated:
            x = rotation.rotate(x)
        scale = x.abs().amax(dim=0) / 448
        parts += [scale.numpy().tobytes(), (x / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()]
    return b"".join(parts)


def test_fp8_rotation_and_token_scales_cut_the_error_of_attention_scores_and_older_blocks_still_decode() -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=64)
    payload, reference = _kv(g, 64)  # keys with three outlier channels
    data = {
        "new": encode("fp8", g, 64, payload),
        "rotated per channel": _per_channel_fp8(g, 64, reference, rotated=True),
        "unrotated": _per_channel_fp8(g, 64, reference, rotated=False),
    }
    assert rotation_block(64) == 64
    got = {name: _values(g, decode("fp8", g, 64, d)).reshape(reference.shape) for name, d in data.items()}
    for x in got.values():  # each decodes to the values (an old block as it was encoded)
        assert float((x - reference).norm() / reference.norm()) < 0.04
    # Attention scores q.k with queries that share the keys' outlier channels (as real ones do): the
    # rotation spreads those channels' rounding over all 64, and centring the keys takes their
    # common part out of what is rounded, so the scores err less.
    q = torch.randn(256, g.head_dim, generator=torch.Generator().manual_seed(1))
    q[:, :3] *= 20
    keys = reference[0::2]

    def score_error(x: torch.Tensor) -> float:
        return float(((x[0::2] - keys) @ q.T).norm() / (keys @ q.T).norm())

    errors = {name: score_error(x) for name, x in got.items()}
    assert errors["new"] < errors["rotated per channel"] < 0.5 * errors["unrotated"], errors
    assert [rotation_block(d) for d in (128, 96, 80, 6, 7)] == [64, 32, 16, 2, 1]


@pytest.mark.parametrize("codec", ["fp8", "int4"])
def test_a_documents_first_token_is_kept_exact(codec: str) -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="float32", block_tokens=64)
    payload, reference = _kv(g, 64)
    first = _values(g, decode(codec, g, 64, encode(codec, g, 64, payload, first=True))).reshape(reference.shape)
    later = _values(g, decode(codec, g, 64, encode(codec, g, 64, payload))).reshape(reference.shape)
    assert torch.equal(first[:, 0], reference[:, 0]) and not torch.equal(later[:, 0], reference[:, 0])
    assert torch.equal(first[:, 1:], later[:, 1:]) or codec == "fp8"  # fp8's key line is fitted without it


def test_fp8_picks_the_scale_that_errs_least(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="float32", block_tokens=64)
    payload, reference = _kv(g, 64)

    def error() -> float:
        return float((_values(g, decode("fp8", g, 64, encode("fp8", g, 64, payload))) - reference.reshape(-1)).norm())

    searched = error()
    monkeypatch.setattr(fp8, "_FP8_CANDIDATES", 1)  # only the smallest scale that fits each token
    assert searched < 0.95 * error()


def test_int4_rotation_cuts_the_error_and_unrotated_blocks_still_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="float32", block_tokens=64)
    payload, reference = _kv(g, 64)  # keys with three outlier channels
    rotated = encode("int4", g, 64, payload)
    monkeypatch.setattr(int4, "rotate", lambda x: x)
    monkeypatch.setattr(int4, "GROUPED", 0)  # one float32 pair of key statistics per block
    unrotated = encode("int4", g, 64, payload)
    monkeypatch.undo()
    old = unrotated[:6] + struct.pack("<H", 0) + unrotated[8:]  # as written before the rotation: flags 0

    got = {
        name: _values(g, decode("int4", g, 64, d)).reshape(reference.shape)
        for name, d in (("new", rotated), ("old", old))
    }
    for x in got.values():  # both decode to the values (an old block is not rotated back)
        assert float((x - reference).norm() / reference.norm()) < 0.12
    # Attention scores q.k with queries that share the keys' outlier channels: their 4-bit steps are
    # coarse, and the rotation spreads those channels over all 64, so the scores err less.
    q = torch.randn(256, g.head_dim, generator=torch.Generator().manual_seed(1))
    q[:, :3] *= 20
    keys = reference[0::2]
    error = {name: float(((x[0::2] - keys) @ q.T).norm() / (keys @ q.T).norm()) for name, x in got.items()}
    assert error["new"] < 0.7 * error["old"], error


def _query_moments(g: Geometry, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries that look along a few directions (as real ones do: a few channel pairs carry most of a
    head's query norm), and their second moment for every layer and head, `[layers, H, D, D]`."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(1, -1.5, g.head_dim)  # 10 down to 0.03 along a random orthonormal basis
    basis = torch.linalg.qr(torch.randn(g.head_dim, g.head_dim, generator=gen))[0]
    q = (torch.randn(2048, g.head_dim, generator=gen) * spread) @ basis.T
    moments = (q.T @ q / len(q)).expand(g.layers, g.kv_heads, g.head_dim, g.head_dim)
    return q, moments.contiguous()


@pytest.mark.parametrize("codec", ["fp8", "int4", "int8"])
def test_keys_are_rounded_where_queries_look_least(codec: str) -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="float32", block_tokens=64)
    payload, reference = _kv(g, 64)
    q, moments = _query_moments(g)
    shaping = codecs.key_shaping(moments)
    plain, shaped = encode(codec, g, 64, payload, first=True), encode(codec, g, 64, payload, True, shaping)
    assert len(shaped) == len(plain) and shaped[:HEADER_BYTES] == plain[:HEADER_BYTES]  # the same format
    encoded = {"plain": plain, "shaped": shaped}
    got = {n: _values(g, decode(codec, g, 64, d)).reshape(reference.shape) for n, d in encoded.items()}
    assert torch.equal(got["plain"][1::2], got["shaped"][1::2])  # values are rounded to their nearest code
    keys = reference[0::2]
    score_error = {n: float(((x[0::2] - keys) @ q.T).norm() / (keys @ q.T).norm()) for n, x in got.items()}
    plain_error = {n: float((x[0::2] - keys).norm() / keys.norm()) for n, x in got.items()}
    # The error of scores q.k falls though the keys' own error grows: it moved where queries hardly look.
    assert score_error["shaped"] < 0.75 * score_error["plain"], score_error
    assert plain_error["shaped"] > plain_error["plain"], plain_error
    # Queries that look every way alike leave nothing to shape: each value takes its nearest code.
    flat = codecs.key_shaping(torch.eye(g.head_dim).expand(g.layers, g.kv_heads, g.head_dim, g.head_dim))
    assert encode(codec, g, 64, payload, True, flat) == plain


def test_key_shaping_refuses_what_does_not_fit() -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="float32", block_tokens=64)
    payload, _ = _kv(g, 64)
    _, moments = _query_moments(g)
    with pytest.raises(InvalidArgument, match="does not fit"):
        encode("fp8", g, 64, payload, shaping=codecs.key_shaping(moments[:1]))
    with pytest.raises(InvalidArgument, match="finite"):
        codecs.key_shaping(moments * float("nan"))


def test_query_moments_are_the_queries_second_moments_and_leave_the_model_as_it_was(
    tiny_models: dict[str, LoadedModel],
) -> None:
    ids = document_ids(tiny_models["llama"].tokenizer, TEXT)[:96]
    for arch, model in tiny_models.items():  # every architecture routes its attention through the hook
        g, implementation = model.geometry, model.model.config._attn_implementation
        before = adapter.prefill(model.model, ids)
        moments = adapter.query_moments(model.model, ids)
        assert moments.shape == (g.layers, g.kv_heads, g.head_dim, g.head_dim), arch
        assert torch.allclose(moments, moments.transpose(-1, -2))
        assert bool((torch.linalg.eigvalsh(moments) > -1e-4).all()), arch  # positive semi-definite
        assert model.model.config._attn_implementation == implementation, arch
        assert bit_identical(adapter.prefill(model.model, ids), before), arch
    # The first layer's queries come straight from the embeddings: doubling its query projection
    # quadruples their second moment (llama has no query norm), and nothing else does.
    model = copy.deepcopy(tiny_models["llama"].model)
    moments = adapter.query_moments(model, ids)
    model.model.layers[0].self_attn.q_proj.weight.data *= 2
    assert torch.allclose(adapter.query_moments(model, ids)[0], 4 * moments[0], rtol=1e-4, atol=1e-6)
    llama = tiny_models["llama"]
    assert llama.key_shaping is llama.key_shaping  # computed once per model
    assert llama.key_shaping is not None and llama.key_shaping.shape == moments.shape


def test_keys_round_to_their_nearest_codes_where_queries_cannot_be_observed(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An attention implementation kvcdn cannot wrap (here: no mask function known for it).
    monkeypatch.setattr(transformers.masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", {})
    ids = document_ids(llama.tokenizer, TEXT)[:32]
    with pytest.raises(InvalidArgument, match="no mask function"):
        adapter.query_moments(llama.model, ids)
    fresh = dataclasses.replace(llama)  # no shaping computed yet
    with caplog.at_level("WARNING"):
        assert fresh.key_shaping is None  # publishing goes on, with nearest codes, and says so
    assert "nearest codes" in caplog.text and "no mask function" in caplog.text
    assert llama.model.config._attn_implementation == "sdpa"  # the model was left as it was


def test_int4_keys_grouped_over_fewer_tokens_err_less_for_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="float32", block_tokens=256)
    payload, reference = _kv(g, 256)
    drift = torch.linspace(-30, 30, 256).view(1, 256, 1, 1)  # keys that move over the block's tokens
    keys = reference.clone()
    keys[0::2] += drift * torch.randn(1, 1, g.kv_heads, g.head_dim, generator=torch.Generator().manual_seed(3))
    payload = keys.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    grouped = encode("int4", g, 256, payload, first=True)
    monkeypatch.setattr(int4, "GROUPED", 0)
    whole = encode("int4", g, 256, payload, first=True)  # as written before GROUPED: flags ROTATED | SINK
    monkeypatch.undo()
    assert int.from_bytes(grouped[6:8], "little") == ROTATED | GROUPED | SINK
    assert int.from_bytes(whole[6:8], "little") == ROTATED | SINK
    assert len(grouped) == len(whole)  # two float16 pairs per channel cost what one float32 pair did
    got = {n: _values(g, decode("int4", g, 256, d)).reshape(keys.shape) for n, d in (("g", grouped), ("w", whole))}
    error = {n: float((x[0::2] - keys[0::2]).norm() / keys[0::2].norm()) for n, x in got.items()}
    assert error["g"] < 0.8 * error["w"], error
    # Keys beyond what float16 statistics hold are written ungrouped, and still decode.
    keys[0::2] *= 1e4
    data = encode("int4", g, 256, keys.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert int.from_bytes(data[6:8], "little") == ROTATED
    back = _values(g, decode("int4", g, 256, data)).reshape(keys.shape)
    assert float((back[0::2] - keys[0::2]).norm() / keys[0::2].norm()) < 0.12
    # Values' statistics are float16 in every int4 block: values beyond it are refused, not garbled.
    keys[1::2] *= 1e4
    with pytest.raises(InvalidArgument, match="float16"):
        encode("int4", g, 256, keys.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _assemble(
    g: Geometry,
    codec: str,
    blocks: list[bytes],
    n_tokens: int,
    on_device: bool,
    frame: int = 100,
    staging: StagingPool | None = None,
    last_first: bool = False,
) -> list[LayerKV]:
    """Feed encoded `blocks` (frames of `frame` bytes, as a stream would) through a DecodingAssembler
    (with `staging`, encoded blocks decoded with torch ops land in its buffers, as on a GPU), in
    order or (`last_first`) the last block first."""
    infos = [
        pb.BlockInfo(index=i, n_tokens=min(g.block_tokens, n_tokens - i * g.block_tokens), n_bytes=len(b), codec=codec)
        for i, b in enumerate(blocks)
    ]
    into = KVAssembler(g, n_tokens, torch.device("cpu"), staging, host_staging=not on_device)
    target = DecodingAssembler(into, infos, on_device=on_device)
    for info, data in sorted(zip(infos, blocks, strict=True), key=lambda b: b[0].index, reverse=last_first):
        start = info.index * g.block_tokens
        for offset in range(0, len(data), frame):
            target.write(start, info.n_tokens, offset, memoryview(data[offset : offset + frame]))
            target.frame_done(start, info.n_tokens, min(len(data), offset + frame))
        target.block_done(start, info.n_tokens)
    return target.layers()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_decoding_with_torch_ops_where_the_cache_lands_is_bit_identical(dtype: str, codec: str) -> None:
    # The path a GPU takes (encoded bytes copied over, decoded with torch ops, landed in place), run
    # on the CPU: the same values, bit for bit, as decoding on the host. head_dim 6 and 7 tokens:
    # the int8 and int4 scale arrays start at offsets torch cannot view in place.
    g = Geometry(layers=3, kv_heads=3, head_dim=6, dtype=dtype, block_tokens=16)
    n_tokens = 39
    blocks = [
        encode(codec, g, n, _kv(g, n, seed=i)[0], first=i == 0)
        for i, n in enumerate(min(16, n_tokens - s) for s in range(0, n_tokens, 16))
    ]
    host = _assemble(g, codec, blocks, n_tokens, on_device=False)
    device = _assemble(g, codec, blocks, n_tokens, on_device=True)
    assert bit_identical(device, host) and device[0][0].shape == (1, 3, n_tokens, 6)


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_blocks_decoded_where_the_cache_lands_go_in_batches_whatever_order_they_arrive_in(
    codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU each torch op of a decode is a launch under the GIL the receiving threads share: 8
    # consecutive blocks decode with one set of ops (a first block with its own flags, or a short last
    # one, apart), the same batches in any arrival order, and the cache is the host's, bit for bit.
    g = Geometry(layers=3, kv_heads=3, head_dim=6, dtype="bfloat16", block_tokens=16)
    n_tokens = 18 * 16 + 5  # 19 blocks, the last one short
    lengths = [min(16, n_tokens - s) for s in range(0, n_tokens, 16)]
    blocks = [encode(codec, g, n, _kv(g, n, seed=i)[0], first=i == 0) for i, n in enumerate(lengths)]
    host = _assemble(g, codec, blocks, n_tokens, on_device=False)
    batches: list[int] = []  # blocks per decode
    decode_lossy = codecs.decode_lossy
    monkeypatch.setattr(
        codecs, "decode_lossy", lambda c, part, *a: batches.append(part.layers // 3) or decode_lossy(c, part, *a)
    )
    first_apart = [1, 7] if codec != "int8" else [8]  # fp8 and int4 flag a document's first block
    assert bit_identical(_assemble(g, codec, blocks, n_tokens, on_device=True), host)
    assert batches == [*first_apart, 8, 2, 1]
    batches.clear()
    assert bit_identical(_assemble(g, codec, blocks, n_tokens, on_device=True, last_first=True), host)
    assert batches == [2, 1, 8, *first_apart]


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_fetches_decoded_where_the_cache_lands_reuse_staging_of_every_size(codec: str) -> None:
    # A GPU client's bookkeeping with an unpinned pool: each encoded block lands in a staging buffer
    # taken from the pool and given back once its copy has run; a later fetch of a shorter document
    # takes the short block's buffer while longer ones are free (this crashed on a GPU).
    g = Geometry(layers=3, kv_heads=3, head_dim=6, dtype="bfloat16", block_tokens=16)
    blocks = [encode(codec, g, n, _kv(g, n, seed=i)[0], first=i == 0) for i, n in enumerate((16, 16, 7))]
    pool = StagingPool(pin=False)
    first = _assemble(g, codec, blocks, 39, on_device=True, staging=pool)
    assert pool.allocations == 3 and pool.free_bytes == sum(len(b) for b in blocks)
    assert bit_identical(_assemble(g, codec, blocks, 39, on_device=True, staging=pool), first)
    short = [encode(codec, g, 7, _kv(g, 7, seed=5)[0], first=True)]
    assert len(short[0]) < len(blocks[0]) <= 4 * len(short[0])  # the longer buffers fit it too
    assert bit_identical(
        _assemble(g, codec, short, 7, on_device=True, staging=pool),
        _assemble(g, codec, short, 7, on_device=False),
    )
    assert pool.allocations == 3 and pool.leased == 0  # every fetch reused the buffers of the first


def test_a_fetch_that_fails_mid_block_releases_the_staging_it_leased() -> None:
    # A stream broke after the first frames of the second block: the client closes the assembler,
    # and every lease (the block being received, the block whose copy was queued) goes back.
    g = Geometry(layers=3, kv_heads=3, head_dim=6, dtype="bfloat16", block_tokens=16)
    blocks = [encode("int8", g, 16, _kv(g, 16, seed=i)[0], first=i == 0) for i in range(2)]
    infos = [pb.BlockInfo(index=i, n_tokens=16, n_bytes=len(b), codec="int8") for i, b in enumerate(blocks)]
    pool = StagingPool(pin=False)
    target = DecodingAssembler(KVAssembler(g, 32, torch.device("cpu"), pool, host_staging=False), infos, True)
    target.write(0, 16, 0, memoryview(blocks[0]))
    target.block_done(0, 16)
    target.write(16, 16, 0, memoryview(blocks[1][:100]))
    assert pool.leased == 2
    target.close()
    assert pool.leased == 0 and pool.free_bytes == sum(len(b) for b in blocks)


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_lossy_blocks_decode_on_the_host_layer_by_layer_as_frames_arrive(codec: str) -> None:
    g = Geometry(layers=16, kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=32)
    payload, _ = _kv(g, 32)
    data = encode(codec, g, 32, payload, first=True)
    want = decode(codec, g, 32, data)
    cache = KVAssembler(g, 32, torch.device("cpu"))
    target = DecodingAssembler(cache, [pb.BlockInfo(index=0, n_tokens=32, n_bytes=len(data), codec=codec)])
    frame = len(data) // 10 + 1
    layer = 2 * g.segment_bytes(32)
    decoded = []  # layers of the cache already equal to the decoded block's, after each frame
    for offset in range(0, len(data), frame):
        target.write(0, 32, offset, memoryview(data[offset : offset + frame]))
        target.frame_done(0, 32, min(len(data), offset + frame))
        landed = np.concatenate([r.reshape(-1) for r in cache.regions(0, 32, 0, len(payload))])
        decoded.append([bool((landed[i : i + layer] == want[i : i + layer]).all()) for i in range(0, len(want), layer)])
    target.block_done(0, 32)
    counts = [sum(d) for d in decoded]
    assert all(d == sorted(d, reverse=True) for d in decoded)  # leading layers, in order
    assert counts == sorted(counts) and 0 < counts[4] < g.layers  # half the frames in: some layers, not all
    reference = KVAssembler(g, 32, torch.device("cpu"))
    reference.write(0, 32, 0, want.data)
    assert bit_identical(target.layers(), reference.layers())


def test_lossless_decodes_chunk_by_chunk_as_frames_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Geometry(layers=3, kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=32)
    payload, _ = _kv(g, 32)  # 6,144 values
    monkeypatch.setattr(lossless, "LOSSLESS_CHUNK_ELEMENTS", 1000)  # 7 chunks
    data = encode("lossless", g, 32, payload)
    assert int.from_bytes(data[6:8], "little") == CHUNKED and decode("lossless", g, 32, data).tobytes() == payload
    info = pb.BlockInfo(index=0, n_tokens=32, n_bytes=len(data), codec="lossless")
    cache = KVAssembler(g, 32, torch.device("cpu"))
    target = DecodingAssembler(cache, [info])
    decoded = []  # decoded bytes in the cache after each frame, before the block is done
    for offset in range(0, len(data), 1000):
        target.write(0, 32, offset, memoryview(data[offset : offset + 1000]))
        target.frame_done(0, 32, min(len(data), offset + 1000))
        landed = np.concatenate([r.reshape(-1) for r in cache.regions(0, 32, 0, len(payload))])
        wrong = np.flatnonzero(landed != np.frombuffer(payload, dtype=np.uint8))
        decoded.append(int(wrong[0]) if wrong.size else len(payload))
    target.block_done(0, 32)
    assert decoded == sorted(decoded) and 0 < decoded[len(decoded) // 2] < len(payload)  # streamed in
    reference = KVAssembler(g, 32, torch.device("cpu"))
    reference.write(0, 32, 0, memoryview(payload))
    assert bit_identical(target.layers(), reference.layers())

    # A block written before chunks existed (one chunk, flag 0) decodes with today's decoder.
    monkeypatch.setattr(lossless, "LOSSLESS_CHUNK_ELEMENTS", 1 << 30)
    old = bytearray(encode("lossless", g, 32, payload))
    old[6:8] = b"\0\0"
    monkeypatch.setattr(lossless, "LOSSLESS_CHUNK_ELEMENTS", 1000)
    assert decode("lossless", g, 32, bytes(old)).tobytes() == payload
    assert _assemble(g, "lossless", [bytes(old)], 32, on_device=False)[0][0].shape == (1, 2, 32, 16)
    # Frames smaller than the block header: decoding waits for the header, then streams on.
    assert bit_identical(_assemble(g, "lossless", [data], 32, on_device=False, frame=5), reference.layers())
    # A corrupted middle chunk is DATA_LOSS while streaming: a flipped byte in a zstd plane (its
    # checksum), a plane header naming an unknown method.
    records, pos = [], 12  # (header position, method, length) of every plane of every chunk
    while pos < len(data):
        method, length = struct.unpack_from("<BI", data, pos)
        records.append((pos, method, length))
        pos += 5 + length
    assert len(records) == 2 * 7
    at, method, length = next(r for r in records[6:] if r[1] == 1)  # a compressed plane of chunk 4 or later
    flipped, unknown = bytearray(data), bytearray(data)
    flipped[at + 5 + length // 2] ^= 0x40
    unknown[records[7][0]] = 7
    for bad in (flipped, unknown):
        with pytest.raises(DigestMismatch):
            _assemble(g, "lossless", [bytes(bad)], 32, on_device=False)


def test_device_decoding_refuses_what_it_cannot_decode() -> None:
    g = Geometry(layers=2, kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=32)
    payload, _ = _kv(g, 32)
    with pytest.raises(InvalidArgument, match="decode on the device"):
        _assemble(g, "lossless", [encode("lossless", g, 32, payload)], 32, on_device=True)
    data = encode("fp8", g, 32, payload)
    with pytest.raises(DigestMismatch, match="header"):  # checked on the host before any copy
        _assemble(g, "fp8", [data[:8] + (33).to_bytes(4, "little") + data[12:]], 32, on_device=True)
    scale_inf = data[:12] + np.float32(np.inf).tobytes() + data[16:]  # a scale of inf: found once landed
    with pytest.raises(DigestMismatch, match="non-finite"):
        _assemble(g, "fp8", [scale_inf], 32, on_device=True)
    with pytest.raises(InvalidArgument, match="does not fit"):
        KVAssembler(g, 32, torch.device("cpu")).land(16, 32, torch.zeros(4, 32, 2, 16, dtype=torch.bfloat16))


def test_codec_lists_are_checked() -> None:
    assert parse_codecs("lossless, raw") == ("lossless", "raw")
    assert parse_codecs("", allow_empty=True) == ()
    for bad in ("zip", "raw,raw", ""):
        with pytest.raises(InvalidArgument, match="codecs"):
            parse_codecs(bad)
    with pytest.raises(InvalidArgument):
        ClientConfig(("127.0.0.1:1",), codecs=("gzip",))


async def test_negotiation_between_what_a_document_is_offered_in_and_what_a_client_accepts(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store", codecs=("lossless", "fp8", "int8"))
    try:
        manifest = (await net.origin.publish("doc", TEXT)).manifest
        assert list(manifest.codecs) == ["lossless", "fp8", "int8"]
        doc = document_ids(llama.tokenizer, TEXT)
        own = adapter.prefill(llama.model, doc)
        raw_bytes = len(doc) * llama.geometry.token_bytes
        async with KVClient([net.edge_address]) as client:
            exact = await client.fetch(llama, doc)  # default: lossless, then raw
            raw = await client.fetch(llama, doc, ["raw"])
            lossy = await client.fetch(llama, doc, ["fp8", "raw"])
            uniform = await client.fetch(llama, doc, ["int8"])
            absent = await client.fetch(llama, doc, ["int4"])  # not offered: nothing cached
        assert (exact.codec, raw.codec, lossy.codec) == ("lossless", "raw", "fp8")
        assert bit_identical(exact.layers, own) and bit_identical(raw.layers, own)
        assert exact.n_bytes < raw.n_bytes == raw_bytes and 3 * lossy.n_bytes < raw_bytes  # fp8 of float32
        assert uniform.codec == "int8" and 3 * uniform.n_bytes < raw_bytes
        error = {}  # worst relative error of a layer's keys or values, on a model's real KV
        for name, fetched in (("fp8", lossy), ("int8", uniform)):
            assert not bit_identical(fetched.layers, own)
            error[name] = max(
                float((got - want).norm() / want.norm())
                for (k, v), (rk, rv) in zip(fetched.layers, own, strict=True)
                for got, want in ((k, rk), (v, rv))
            )
        assert error["fp8"] < 0.05 and error["int8"] < error["fp8"] / 2
        assert absent.cached_tokens == 0 and absent.layers == []
        # The origin rounds keys by its model's queries: what it stores is what encode makes with them.
        g = llama.geometry
        for info in manifest.blocks:
            _, payload, _ = net.origin.blocks.get(info.key)
            stored = net.origin.blocks.get(encoded_key(info.key, "fp8"))[1]
            first = info.index == 0
            assert bytes(stored) == encode("fp8", g, info.n_tokens, payload, first, llama.key_shaping)
            assert bytes(stored) != encode("fp8", g, info.n_tokens, payload, first)
        # The edge holds and relays the encodings as blocks of their own, at their encoded sizes.
        tier = memory_tier(net.edge)
        for info in manifest.blocks:
            for codec in ("lossless", "fp8", "int8"):
                held = tier.info(encoded_key(info.key, codec))
                assert held is not None and held.codec == codec and held.raw_bytes == info.n_bytes > held.n_bytes
    finally:
        await stop_network(net)


@pytest.mark.parametrize("bulk", [True, False])
async def test_lossless_blocks_decode_while_their_frames_stream_in(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk: bool
) -> None:
    monkeypatch.setattr(lossless, "LOSSLESS_CHUNK_ELEMENTS", 500)  # several chunks and frames per block
    before_end: list[int] = []  # per block, values decoded when its last frame was verified

    def finish(self: lossless.Planes) -> None:
        before_end.append(self._done)
        real_finish(self)

    real_finish = lossless.Planes.finish
    monkeypatch.setattr(lossless.Planes, "finish", finish)
    net = await start_network(llama, tmp_path / "store", codecs=("lossless",))
    try:
        manifest = (await net.origin.publish("doc", TEXT)).manifest
        doc = document_ids(llama.tokenizer, TEXT)
        async with KVClient(ClientConfig((net.edge_address,), bulk=bulk)) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.codec == "lossless" and bit_identical(fetched.layers, adapter.prefill(llama.model, doc))
        assert len(before_end) == len(manifest.blocks) and all(n > 0 for n in before_end)  # streamed in
    finally:
        await stop_network(net)


async def test_a_document_published_raw_only_is_served_raw_to_a_default_client(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store")  # offers no encoding: blocks as before codecs
    try:
        await net.origin.publish("doc", TEXT)
        doc = document_ids(llama.tokenizer, TEXT)
        async with KVClient([net.edge_address]) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.codec == "raw" and fetched.cached_tokens == len(doc)
        assert bit_identical(fetched.layers, adapter.prefill(llama.model, doc))
        with pytest.raises(InvalidArgument, match="codecs"):
            await net.origin.publish("other", TEXT, ["zip"])
    finally:
        await stop_network(net)


async def test_an_edge_cannot_hand_a_lossy_cache_to_a_client_that_demands_exactness(
    llama: LoadedModel, tmp_path: Path
) -> None:
    net = await start_network(llama, tmp_path / "store", codecs=("fp8",))
    try:
        await net.origin.publish("doc", TEXT)
        doc = document_ids(llama.tokenizer, TEXT)
        real = net.edge.lookup

        async def answers_fp8(fingerprint: str, keys: list[bytes], codecs: list[str], from_peer: bool) -> object:
            return await real(fingerprint, keys, ["fp8"], from_peer)  # whatever the client asked for

        net.edge.lookup = answers_fp8  # type: ignore[assignment]
        async with KVClient([net.edge_address]) as client:
            with pytest.raises(DigestMismatch, match="did not accept"):
                await client.fetch(llama, doc)  # accepts lossless, raw
    finally:
        await stop_network(net)


async def test_purge_removes_every_encoding_at_the_origin_and_the_edges(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store", codecs=("lossless", "int4"))
    try:
        manifest = (await net.origin.publish("doc", TEXT)).manifest
        doc = document_ids(llama.tokenizer, TEXT)
        async with KVClient([net.edge_address]) as client:
            assert (await client.fetch(llama, doc)).codec == "lossless"
            assert (await client.fetch(llama, doc, ["int4"])).codec == "int4"
        keys = [encoded_key(b.key, c) for b in manifest.blocks for c in ("raw", "lossless", "int4")]
        assert all(k in net.origin.blocks for k in keys)
        async with CacheReader(net.origin_server.address) as origin:
            purged = await origin.purge("doc")
        assert purged.blocks_removed == len(keys)
        for _ in range(500):
            if net.edge.invalidated_seq >= purged.seq:
                break
            await asyncio.sleep(0.02)
        tier = memory_tier(net.edge)
        assert not any(k in net.origin.blocks or tier.info(k) is not None for k in keys)
    finally:
        await stop_network(net)
