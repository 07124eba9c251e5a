"""The container every encoded block shares (SPEC.md section 8): its header, checked against the
block's info before any data is touched, and the helpers the lossy codecs take bodies apart with."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvcdn.errors import DigestMismatch
from kvcdn.model.tensors import TORCH_DTYPES
from kvcdn.spec.codecs import (
    CODECS,
    FLAGS,
    HEADER_BYTES,
    SINK,
    fixed_body_bytes,
    lossy_segment_bytes,
    max_encoded_bytes,
)
from kvcdn.spec.geometry import Geometry

HEAD = struct.Struct("<4sBBHI")
"""`KVC1 | u8 codec id | u8 element bytes | u16 flags | u32 n_tokens`."""
MAGIC = b"KVC1"
assert HEAD.size == HEADER_BYTES

Layout = Sequence[tuple[torch.dtype, tuple[int, ...]]]
"""The arrays that start a lossy segment: each one's dtype and per-layer shape, in order."""


def header(codec: str, geometry: Geometry, n_tokens: int, flags: int) -> bytes:
    return HEAD.pack(MAGIC, CODECS[codec].id, geometry.element_bytes, flags, n_tokens)


def body(codec: str, geometry: Geometry, n_tokens: int, view: memoryview) -> tuple[memoryview, int]:
    """The body of an encoded block and its header flags, once its size and header match its info
    (else DigestMismatch)."""
    if len(view) < HEAD.size or len(view) > max_encoded_bytes(codec, geometry, n_tokens):
        raise DigestMismatch(f"{codec} block of {len(view)} bytes cannot hold {n_tokens} tokens")
    magic, codec_id, element, flags, tokens = HEAD.unpack_from(view)
    if (magic, codec_id, element, tokens) != (MAGIC, CODECS[codec].id, geometry.element_bytes, n_tokens):
        raise DigestMismatch(f"{codec} block header does not match its info ({n_tokens} tokens, {geometry.dtype})")
    if flags not in FLAGS.get(codec, {0}):
        raise DigestMismatch(f"{codec} block header carries unknown flags {flags:#x}")
    rest = view[HEAD.size :]
    if codec != "lossless" and len(rest) != (expected := fixed_body_bytes(codec, geometry, n_tokens, flags)):
        raise DigestMismatch(f"{codec} block body of {len(rest)} bytes, expected {expected}")
    return rest, flags


def all_finite(values: torch.Tensor) -> torch.Tensor:
    """Whether every value is finite, as a boolean tensor on their device: one min/max pass (which
    propagates NaN), 30x faster on a CPU core than `isfinite(values).all()` over bf16 values, which
    took half of an int8 block's decode time."""
    low, high = torch.aminmax(values)
    return torch.isfinite(low) & torch.isfinite(high)


def segments(geometry: Geometry) -> int:
    return 2 * geometry.layers


def as_float(
    geometry: Geometry, n_tokens: int, payload: bytes | memoryview, device: torch.device | None = None
) -> torch.Tensor:
    """The payload as float32 `[2 * layers, n_tokens, kv_heads, head_dim]` (segment order), on
    `device` (default the CPU): the bytes travel there as they are and widen there (one core of the
    2-core machine took 64 ms to widen a 256-token Qwen3-4B block, 38 MB, of which the copy 4 ms;
    and float32 would be twice the bytes to copy)."""
    raw = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
    flat = (raw if device is None else raw.to(device)).view(TORCH_DTYPES[geometry.dtype])
    return flat.reshape(segments(geometry), n_tokens, geometry.kv_heads, geometry.head_dim).float()


def copied(rows: torch.Tensor) -> torch.Tensor:
    """A fresh, row-major copy of `rows` (uint8, `[n, bytes]`), which any dtype can view whatever
    offset and stride the rows had (`clone` keeps a stride of one row)."""
    return torch.empty(rows.shape, dtype=torch.uint8, device=rows.device).copy_(rows)


def sink_layout(geometry: Geometry, flags: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The array a SINK block's segments carry before their codes (fp8, int4): the block's first
    token, exact in the cache's dtype; none without the flag. Decoders write it over token 0."""
    return [(TORCH_DTYPES[geometry.dtype], (1, geometry.kv_heads, geometry.head_dim))] if flags & SINK else []


def segment_kinds(
    body: torch.Tensor,
    codec: str,
    geometry: Geometry,
    n_tokens: int,
    flags: int,
    layouts: tuple[Layout, Layout],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]]:
    """A lossy body (fp8 with TOKEN_SCALED, int8, int4) taken apart: the cache to fill,
    `[2 * layers, n_tokens, kv_heads, head_dim]` in its dtype, and per kind (keys, then values) that
    cache's segments of the kind, the arrays that start each of their body segments (`layouts[kind]`,
    each viewed as `[layers, *shape]` in its dtype, to broadcast over the segments) and the codes
    after them (`[layers, bytes]` uint8)."""
    h, d, layers = geometry.kv_heads, geometry.head_dim, geometry.layers
    keys_bytes, values_bytes, _ = lossy_segment_bytes(codec, geometry, n_tokens, flags)
    rows = body.view(layers, keys_bytes + values_bytes)
    out = torch.empty(2 * layers, n_tokens, h, d, dtype=TORCH_DTYPES[geometry.dtype], device=body.device)
    kinds = []
    for part_segments, part, layout in (
        (out[0::2], rows[:, :keys_bytes], layouts[0]),
        (out[1::2], rows[:, keys_bytes:], layouts[1]),
    ):
        arrays, at = [], 0
        for dtype, shape in layout:
            size = math.prod(shape) * dtype.itemsize
            arrays.append(copied(part[:, at : at + size]).view(dtype).view(layers, *shape))
            at += size
        kinds.append((part_segments, arrays, part[:, at:]))
    return out, kinds


@dataclasses.dataclass(frozen=True)
class LossyCodec:
    """One lossy codec as the encoder and decoder in `kvcdn.model.codecs` drive it."""

    name: str
    flags: Callable[[torch.Tensor, Geometry, bool], int]
    """The header flags for a block's values (`as_float`'s, float32) and whether it is its document's
    first; InvalidArgument where the codec cannot hold them."""
    encode: Callable[[torch.Tensor, bool, torch.dtype | None, torch.Tensor | None, int], list[torch.Tensor]]
    """The arrays and codes of every layer's segment of one kind: (values `[layers, T, H, D]` float32,
    keys?, the cache's dtype for a SINK block else None, key shaping factors or None, flags), each
    array with the layers first."""
    decode: Callable[[torch.Tensor, Geometry, int, int], torch.Tensor]
    """(checked body, geometry, n_tokens, flags) -> values `[2 * layers, n_tokens, H, D]` in the
    cache's dtype, with torch ops on the body's device."""
