"""KV codecs: how a block payload (kvcdn.spec.geometry's layout) is encoded into fewer bytes and back.

The formats are SPEC.md section 8 (`proto/kvcdn/v1/SPEC.md`); names, ids and sizes are
kvcdn.spec.codecs; why each format is shaped as it is, and what each costs in accuracy, is
docs/architecture.md (codecs). Here: `lossless` (bit-exact byte planes), and the lossy codecs behind
one registry (`LOSSY`: `fp8`, `int4`, `int8`), each a module with its flags, encoder and decoder.
Edges verify, store and relay encoded blocks like raw ones without this package: origins encode,
clients decode where the cache lands (kvcdn.model.receiving).

Decoders check every length against the geometry before touching data: a truncated or corrupted
encoding is a DigestMismatch (DATA_LOSS), never a crash or an oversized allocation.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.model.codecs import fp8, int4, int8, lossless
from kvcdn.model.codecs.container import HEAD, LossyCodec, all_finite, as_float, body, header
from kvcdn.model.codecs.rotation import key_shaping, rotation_block
from kvcdn.model.tensors import TORCH_DTYPES
from kvcdn.spec.codecs import CODECS, SINK, parse_codecs
from kvcdn.spec.geometry import Geometry

__all__ = [
    "DEVICE_DECODED",
    "HEAD",
    "LOSSY",
    "all_finite",
    "body",
    "decode",
    "decode_lossy",
    "decoded_bytes",
    "decodes_on_device",
    "encode",
    "key_shaping",
    "rotation_block",
]

LOSSY: dict[str, LossyCodec] = {codec.name: codec for codec in (fp8.CODEC, int4.CODEC, int8.CODEC)}
"""The lossy codecs, by name: what the encoder and decoders below dispatch on."""
assert set(LOSSY) | {"raw", "lossless"} == set(CODECS), "every codec kvcdn.spec.codecs names is implemented"

DEVICE_DECODED = frozenset(LOSSY)
"""Codecs decoded with torch ops where the cache lands (on a GPU after copying the encoded bytes,
which are 2-4x fewer); lossless needs zstd, which runs on the CPU."""

_ENCODE_ELEMENTS = 1 << 19
"""About how many values of one kind (keys or values) the lossy encoders take at once."""


def encode(
    codec: str,
    geometry: Geometry,
    n_tokens: int,
    payload: bytes | memoryview,
    first: bool = False,
    shaping: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> bytes:
    """The `codec` encoding of an n-token block payload; `first`: the block is its document's first
    (fp8 and int4 keep that block's first token, the attention sink, exact); `shaping`: the model's
    `key_shaping` (lossy codecs then round keys where the model's queries hardly look; without it,
    each value to its nearest code); `device`: where a lossy encoder's torch ops run (an origin's GPU:
    they run at 0.05-0.15 GB/s on a CPU core). The format is the same either way."""
    parse_codecs([codec], "codec")
    if len(payload) != geometry.block_bytes(n_tokens):
        raise InvalidArgument(f"payload of {len(payload)} bytes is not an {n_tokens}-token block")
    expected = (geometry.layers, geometry.kv_heads, geometry.head_dim, geometry.head_dim)
    if shaping is not None and tuple(shaping.shape) != expected:
        raise InvalidArgument(f"key shaping of shape {tuple(shaping.shape)} does not fit this geometry: {expected}")
    if codec == "raw":
        return bytes(payload)
    if codec == "lossless":
        return lossless.encode(geometry, n_tokens, payload)
    lossy = LOSSY[codec]
    values = as_float(geometry, n_tokens, payload, device)
    flags = lossy.flags(values, geometry, first)
    sink = TORCH_DTYPES[geometry.dtype] if flags & SINK else None
    factor = shaping.to(values.device) if shaping is not None else None
    # On a CPU a few layers at a time, their arrays at once (a layer alone is too small for torch's
    # ops to pay, every layer at once too large to stay in the core's cache); on a GPU every layer at
    # once. Per layer its keys' segment, then its values' (the body's order).
    on_cpu = values.device.type == "cpu"
    group = max(1, _ENCODE_ELEMENTS // values[0].numel()) if on_cpu else geometry.layers
    rows = []
    for at in range(0, geometry.layers, group):
        keys, vals = values[2 * at : 2 * (at + group) : 2], values[2 * at + 1 : 2 * (at + group) : 2]
        shaped = factor[at : at + group] if factor is not None else None
        kinds = (lossy.encode(keys, True, sink, shaped, flags), lossy.encode(vals, False, sink, None, flags))
        rows.append(torch.cat([a.contiguous().view(torch.uint8).reshape(len(keys), -1) for k in kinds for a in k], 1))
    return header(codec, geometry, n_tokens, flags) + torch.cat(rows).cpu().numpy().tobytes()


def decode(codec: str, geometry: Geometry, n_tokens: int, data: bytes | memoryview) -> np.ndarray:
    """The block payload (uint8, `geometry.block_bytes(n_tokens)` long) that `data` encodes."""
    if codec == "raw":
        if len(data) != (raw := geometry.block_bytes(n_tokens)):
            raise DigestMismatch(f"raw block of {len(data)} bytes, expected {raw}")
        return np.frombuffer(data, dtype=np.uint8)
    rest, flags = body(codec, geometry, n_tokens, memoryview(data))
    if codec == "lossless":
        return lossless.decode(geometry, n_tokens, rest, flags)
    return decoded_bytes(codec, geometry, n_tokens, torch.from_numpy(np.frombuffer(rest, dtype=np.uint8).copy()), flags)


def decoded_bytes(codec: str, geometry: Geometry, n_tokens: int, rest: torch.Tensor, flags: int) -> np.ndarray:
    """`decode_lossy` on the CPU, as payload bytes, once every value is known to be finite."""
    values = decode_lossy(codec, geometry, n_tokens, rest, flags)
    if not bool(all_finite(values)):
        raise DigestMismatch(f"{codec} block decodes to non-finite values")
    return values.reshape(-1).view(torch.uint8).numpy()


def decodes_on_device(codec: str, device: torch.device) -> bool:
    """Whether blocks in `codec` fetched for `device` are decoded there (DecodingAssembler)."""
    return device.type == "cuda" and codec in DEVICE_DECODED


def decode_lossy(codec: str, geometry: Geometry, n_tokens: int, rest: torch.Tensor, flags: int) -> torch.Tensor:
    """The values a checked lossy block body encodes, `[2 * layers, n_tokens, kv_heads, head_dim]` in
    the cache's dtype, computed with torch ops on `rest`'s device (uint8, `body`'s length; `flags`
    from its header): the same operations in the same order on every device. Elementwise steps round
    alike everywhere; the rotation back is a float32 matrix product, whose summation order a GPU
    library may choose differently, so a GPU's values can differ from a CPU's in the last bit of the
    float32 product before it is rounded into the cache's dtype (rarely visible after that)."""
    return LOSSY[codec].decode(rest, geometry, n_tokens, flags)
