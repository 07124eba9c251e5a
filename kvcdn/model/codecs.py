"""KV codecs: how a block payload (kvcdn.spec.geometry's layout) is encoded into fewer bytes and back.

Names and sizes are kvcdn.spec.codecs. A published document can be offered in several encodings;
each encoded block is a block of its own (kvcdn.spec.identity.encoded_key). Frames and digests cover
the encoded bytes, so edges verify, store and relay encoded blocks exactly like raw ones, without
decoding (and without this module). Origins encode; clients decode where the cache lands.

Every encoded block starts with `KVC1 | u8 codec id | u8 element bytes | u16 flags | u32 n_tokens`, then:

- `lossless` (bit-exact): byte planes. Element byte i of every value goes to plane i (for bf16 the
  high plane holds sign and exponent and compresses ~2.6x; the low plane is mantissa noise); each
  plane is zstd-compressed (level 1, with its checksum) when that saves at least 5 %, else stored. Per plane
  `u8 method (0 stored, 1 zstd) | u32 length | bytes`. Flag bit 0 (`CHUNKED`, set by this encoder):
  the planes are coded per chunk of `LOSSLESS_CHUNK_ELEMENTS` values, chunk after chunk, so a
  receiver decodes each chunk as soon as its bytes are verified (`DecodingAssembler.frame_done`),
  straight into the cache, while later frames are still on the wire; without the flag (blocks
  written before it existed) the whole block is one chunk.
- `fp8` (lossy): float8 e4m3 codes of each head's vector after an orthonormal Walsh-Hadamard
  rotation of `rotation_block(head_dim)` channels (block-diagonal where head_dim is larger), which
  spreads a few large channels' values over all of them, so e4m3's relative rounding costs the model
  less; decoding rotates back. Flags `ROTATED | TOKEN_SCALED` (this encoder): keys are first centred
  on a line over the block's tokens per (head, channel) (least squares; bfloat16 intercept and
  slope): keys share a large, slowly turning part per channel, and e4m3 rounds relative to the
  magnitude. Per head a float32 base scale (amax over the block / 448), per (token, head) a 4-bit
  step below it (scale = base * 2^(-step/4)): of the smallest that fits the token's values and the
  next three, the one whose codes err least (where values fall within an octave sets e4m3's
  rounding). Flag `SINK` (a document's first block): each segment also carries the block's first
  token exactly, in the cache's dtype (the attention sink, which every later token attends to; the
  line is fitted without it). Per segment: `base [H] f32 | steps [T*H/2] u8 | keys only: intercept
  [H*D] bf16, slope [H*D] bf16 | SINK: first token [H*D] | codes [T*H*D] u8`; 1.96x against bf16.
  Blocks written before TOKEN_SCALED (flag `ROTATED` or none: one float32 scale per (head, channel)
  over the block's tokens) still decode.
- `int4` (lossy, KIVI-style): asymmetric 4-bit codes, two per byte, after fp8's rotation (flag
  `ROTATED`, set by this encoder; blocks without it, written before it existed, decode unrotated);
  keys per channel (flag `GROUPED`, set where every rotated key fits float16 well: one float16
  minimum and step per (head, channel) for each `INT4_KEY_GROUP` = 128 tokens, the same bytes as one
  float32 pair per 256-token block; without it one float32 pair over the block's tokens), values per
  token (one float16 minimum and step per (token, head) over the head's channels); flag `SINK` as
  fp8's (a document's first token exact). Body: per segment `minimum | step | SINK: first token
  [H*D] | codes [T*H*D/2] u8`. The rotation and the sink token cut KL to the exact cache 3x on SmolLM2
  float32, the key groups another 1.4x (`kvcdn loadtest codecs`).
- `int8` (lossy): symmetric 8-bit codes after fp8's rotation (always; no flag); keys per channel (one
  float32 scale per (head, channel) over the block's tokens), values per token (one bfloat16 scale
  per (token, head) over the head's channels); scale = amax / 127, value = code * scale, rotated
  back. Body: per segment `scales | codes [T*H*D] i8`. The same bytes as fp8 within 1 %, and a
  uniform grid fits rotated (near-Gaussian) values better than e4m3's 3-bit mantissa: KL to the
  exact cache ~3x lower than fp8's on SmolLM2 float32 (`kvcdn loadtest codecs`).

Shaped keys (every lossy codec, when `encode` gets the model's `key_shaping`): keys are not rounded
each to its nearest code but channel by channel, each rounding's error carried into the channels
after it, weighted by the second moment of the queries that read the head (GPTQ's rounding, with
queries in place of a layer's inputs). A key's error e moves an attention score by q . e, so the
error goes where queries hardly look: on SmolLM2 float32 fp8's KL to the exact cache fell 1.7x
(top-1 98.9% -> 99.7%) and int4's 2.2x (`kvcdn loadtest codecs`). Same format; decoders need nothing.

Decoders check every length against the geometry before touching data: a truncated or corrupted
encoding is a DigestMismatch (DATA_LOSS), never a crash or an oversized allocation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from collections.abc import Callable, Sequence

import numpy as np
import torch
import zstandard

from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.model.tensors import TORCH_DTYPES, KVAssembler, LayerKV
from kvcdn.spec.codecs import (
    CHUNKED,
    CODECS,
    FLAGS,
    GROUPED,
    HEADER_BYTES,
    INT4_KEY_GROUP,
    LOSSLESS_CHUNK_ELEMENTS,
    PLANE_HEADER_BYTES,
    ROTATED,
    SINK,
    TOKEN_SCALED,
    fixed_body_bytes,
    int4_key_groups,
    lossy_segment_bytes,
    max_encoded_bytes,
    parse_codecs,
)
from kvcdn.spec.geometry import Geometry
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = [
    "CHUNKED",
    "DEVICE_DECODED",
    "GROUPED",
    "ROTATED",
    "SINK",
    "TOKEN_SCALED",
    "DecodingAssembler",
    "decode",
    "decode_lossy",
    "decodes_on_device",
    "encode",
    "rotation_block",
]

_HEAD = struct.Struct("<4sBBHI")
_MAGIC = b"KVC1"
_PLANE = struct.Struct("<BI")
_U16 = np.dtype("<u2")
"""A 16-bit value as lossless planes make it: plane 0 is its low byte."""
assert _HEAD.size == HEADER_BYTES and _PLANE.size == PLANE_HEADER_BYTES
_FP8_MAX = 448.0
_FP8_STEPS_PER_OCTAVE = 4
_FP8_STEPS = 16
"""fp8's 4-bit scale steps: a (token, head)'s scale is its head's base times 2^(-step/4), step 0 .. 15."""
_FP8_CANDIDATES = 4
"""Scale steps the fp8 encoder tries per (token, head): the smallest that fits, and the next ones up
to one octave larger (e4m3's relative rounding depends on where values fall within an octave)."""
_ENCODE_ELEMENTS = 1 << 19
"""About how many values of one kind (keys or values) the lossy encoders take at once."""
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
"""The float32 value of each e4m3 code (a table lookup decodes faster than torch's conversion)."""


def _segments(geometry: Geometry) -> int:
    return 2 * geometry.layers


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
        head = _HEAD.pack(_MAGIC, CODECS[codec].id, geometry.element_bytes, CHUNKED, n_tokens)
        return head + _encode_planes(payload, geometry.element_bytes)
    values = _as_float(geometry, n_tokens, payload)
    if device is not None:
        values = values.to(device)
    sunk = SINK if first else 0
    flags = {"fp8": ROTATED | TOKEN_SCALED | sunk, "int4": ROTATED | sunk, "int8": 0}[codec]
    if codec == "int4" and not _fits_float16(values[1::2], geometry.head_dim):
        raise InvalidArgument("int4 stores values' statistics in float16, and these values outgrow it: use int8")
    if codec == "int4" and _fits_float16(values[0::2], geometry.head_dim):  # key statistics per group
        flags |= GROUPED
    head = _HEAD.pack(_MAGIC, CODECS[codec].id, geometry.element_bytes, flags, n_tokens)
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
        if codec == "int8":
            kinds = (_encode_int8(keys, True, shaped), _encode_int8(vals, False, None))
        elif codec == "int4":
            grouped = bool(flags & GROUPED)
            kinds = (_encode_int4(keys, True, sink, shaped, grouped), _encode_int4(vals, False, sink, None, False))
        else:
            kinds = (_encode_fp8(keys, True, sink, shaped), _encode_fp8(vals, False, sink, None))
        rows.append(torch.cat([a.contiguous().view(torch.uint8).reshape(len(keys), -1) for k in kinds for a in k], 1))
    return head + torch.cat(rows).cpu().numpy().tobytes()


def decode(codec: str, geometry: Geometry, n_tokens: int, data: bytes | memoryview) -> np.ndarray:
    """The block payload (uint8, `geometry.block_bytes(n_tokens)` long) that `data` encodes."""
    raw = geometry.block_bytes(n_tokens)
    if codec == "raw":
        if len(data) != raw:
            raise DigestMismatch(f"raw block of {len(data)} bytes, expected {raw}")
        return np.frombuffer(data, dtype=np.uint8)
    body, flags = _body(codec, geometry, n_tokens, memoryview(data))
    if codec == "lossless":
        out = np.empty(raw, dtype=np.uint8)
        _Planes(body, raw, geometry.element_bytes, flags, lambda at, length: [out[at : at + length]]).finish()
        return out
    return _decoded_bytes(
        codec, geometry, n_tokens, torch.from_numpy(np.frombuffer(body, dtype=np.uint8).copy()), flags
    )


def _decoded_bytes(codec: str, geometry: Geometry, n_tokens: int, body: torch.Tensor, flags: int) -> np.ndarray:
    """`decode_lossy` on the CPU, as payload bytes, once every value is known to be finite."""
    values = decode_lossy(codec, geometry, n_tokens, body, flags)
    if not bool(_all_finite(values)):
        raise DigestMismatch(f"{codec} block decodes to non-finite values")
    return values.reshape(-1).view(torch.uint8).numpy()


def _all_finite(values: torch.Tensor) -> torch.Tensor:
    """Whether every value is finite, as a boolean tensor on their device: one min/max pass (which
    propagates NaN), 30x faster on a CPU core than `isfinite(values).all()` over bf16 values, which
    took half of an int8 block's decode time."""
    low, high = torch.aminmax(values)
    return torch.isfinite(low) & torch.isfinite(high)


def _body(codec: str, geometry: Geometry, n_tokens: int, view: memoryview) -> tuple[memoryview, int]:
    """The body of an encoded block and its header flags, once its size and header match its info
    (else DigestMismatch)."""
    if len(view) < _HEAD.size or len(view) > max_encoded_bytes(codec, geometry, n_tokens):
        raise DigestMismatch(f"{codec} block of {len(view)} bytes cannot hold {n_tokens} tokens")
    magic, codec_id, element, flags, tokens = _HEAD.unpack_from(view)
    if (magic, codec_id, element, tokens) != (_MAGIC, CODECS[codec].id, geometry.element_bytes, n_tokens):
        raise DigestMismatch(f"{codec} block header does not match its info ({n_tokens} tokens, {geometry.dtype})")
    if flags not in FLAGS.get(codec, {0}):
        raise DigestMismatch(f"{codec} block header carries unknown flags {flags:#x}")
    body = view[_HEAD.size :]
    if codec != "lossless" and len(body) != (expected := fixed_body_bytes(codec, geometry, n_tokens, flags)):
        raise DigestMismatch(f"{codec} block body of {len(body)} bytes, expected {expected}")
    return body, flags


DEVICE_DECODED = frozenset({"fp8", "int8", "int4"})
"""Codecs decoded with torch ops where the cache lands (on a GPU after copying the encoded bytes,
which are 2-4x fewer); lossless needs zstd, which runs on the CPU."""


def decodes_on_device(codec: str, device: torch.device) -> bool:
    """Whether blocks in `codec` fetched for `device` are decoded there (DecodingAssembler)."""
    return device.type == "cuda" and codec in DEVICE_DECODED


def decode_lossy(codec: str, geometry: Geometry, n_tokens: int, body: torch.Tensor, flags: int) -> torch.Tensor:
    """The values a checked fp8, int8 or int4 block body encodes, `[2 * layers, n_tokens, kv_heads, head_dim]`
    in the cache's dtype, computed with torch ops on `body`'s device (uint8, `_body`'s length; `flags`
    from its header): the same operations in the same order on every device. Elementwise steps round
    alike everywhere; fp8's rotation back is a float32 matrix product, whose summation order a GPU
    library may choose differently, so a GPU's values can differ from a CPU's in the last bit of the
    float32 product before it is rounded into the cache's dtype (rarely visible after that); int8
    and (ROTATED) int4 rotate back the same way."""
    if codec == "fp8" and flags & TOKEN_SCALED:
        return _decode_fp8(body, geometry, n_tokens, flags)
    if codec == "fp8":
        return _decode_fp8_per_channel(body, geometry, n_tokens, rotated=bool(flags & ROTATED))
    if codec == "int8":
        return _decode_int8(body, geometry, n_tokens)
    return _decode_int4(body, geometry, n_tokens, flags)


# --- lossless ---------------------------------------------------------------------------------------

_ZSTD_LEVEL = 1
_PAYS = 0.95


def _encode_planes(payload: bytes | memoryview, element: int) -> bytes:
    rows = np.frombuffer(payload, dtype=np.uint8).reshape(-1, element)
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
    parts = []
    for start in range(0, len(rows), LOSSLESS_CHUNK_ELEMENTS):
        chunk = rows[start : start + LOSSLESS_CHUNK_ELEMENTS]
        for i in range(element):
            plane = np.ascontiguousarray(chunk[:, i]).tobytes()
            packed = compressor.compress(plane)
            method, body = (1, packed) if len(packed) < _PAYS * len(plane) else (0, plane)
            parts += [_PLANE.pack(method, len(body)), body]
    return b"".join(parts)


class _Planes:
    """The decoder of one lossless body, chunk by chunk as its bytes arrive (`feed`): each chunk's
    planes are written straight into `regions(offset, length)`, the writable views of decoded bytes
    [offset, offset + length) of the block (element-aligned, in order)."""

    def __init__(
        self,
        body: memoryview,
        raw: int,
        element: int,
        flags: int,
        regions: Callable[[int, int], list[np.ndarray]],
    ) -> None:
        self._body, self._element, self._regions = body, element, regions
        self._values = raw // element
        self._chunk = LOSSLESS_CHUNK_ELEMENTS if flags & CHUNKED else max(1, self._values)
        self._decompressor = zstandard.ZstdDecompressor()
        self._pos = 0
        """Body bytes consumed by the chunks decoded so far."""
        self._done = 0
        """Values decoded so far."""

    def feed(self, available: int) -> None:
        """Decode every chunk whose bytes lie within the first `available` bytes of the body."""
        body = self._body
        while self._done < self._values:
            count = min(self._chunk, self._values - self._done)
            pos, planes = self._pos, []
            for i in range(self._element):
                if pos + _PLANE.size > available:
                    return
                method, length = _PLANE.unpack_from(body, pos)
                if method not in (0, 1) or (method == 0 and length != count):
                    raise DigestMismatch(f"lossless block plane {i} names method {method} for {length} bytes")
                if pos + _PLANE.size + length > available:
                    return
                planes.append((method, body[pos + _PLANE.size : pos + _PLANE.size + length]))
                pos += _PLANE.size + length
            self._decode_chunk(planes, count)
            self._pos, self._done = pos, self._done + count

    def finish(self) -> None:
        """Decode the rest; the body must hold every chunk and nothing after them."""
        self.feed(len(self._body))
        if self._done < self._values:
            raise DigestMismatch("lossless block is truncated")
        if self._pos != len(self._body):
            raise DigestMismatch("lossless block has bytes after its last plane")

    def _decode_chunk(self, planes: list[tuple[int, memoryview]], count: int) -> None:
        e = self._element
        values = []
        for i, (method, data) in enumerate(planes):
            try:
                plane = self._decompressor.decompress(data, max_output_size=count) if method else data
            except zstandard.ZstdError as exc:
                raise DigestMismatch(f"lossless block plane {i} does not decompress: {exc}") from None
            if len(plane) != count:
                raise DigestMismatch(f"lossless block plane {i} holds {len(plane)} bytes, expected {count}")
            values.append(np.frombuffer(plane, dtype=np.uint8))
        at = 0
        for region in self._regions(self._done * e, count * e):
            n = len(region) // e
            if e == 2:  # 16-bit values: one shift and one or, 2.5x faster than two strided byte writes
                wide = region.view(_U16)
                np.left_shift(values[1][at : at + n], 8, out=wide, dtype=_U16)
                np.bitwise_or(wide, values[0][at : at + n], out=wide)
            else:
                target = region.reshape(-1, e)
                for i, bytes_i in enumerate(values):
                    target[:, i] = bytes_i[at : at + n]
            at += n


# --- lossy ------------------------------------------------------------------------------------------


def _copied(rows: torch.Tensor) -> torch.Tensor:
    """A fresh, row-major copy of `rows` (uint8, `[n, bytes]`), which any dtype can view whatever
    offset and stride the rows had (`clone` keeps a stride of one row)."""
    return torch.empty(rows.shape, dtype=torch.uint8, device=rows.device).copy_(rows)


def _fp8_rounded(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to its nearest e4m3 value (saturating at +-448), as float32."""
    return _fp8_values(x.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8))


def _fp8_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 value of each e4m3 code: a table lookup on the CPU (3x faster there than torch's
    conversion, and the same values), the conversion kernel elsewhere."""
    if codes.device.type == "cpu":
        return torch.from_numpy(_FP8_VALUES[codes.numpy()])
    return codes.view(torch.float8_e4m3fn).float()


def _as_float(geometry: Geometry, n_tokens: int, payload: bytes | memoryview) -> torch.Tensor:
    """The payload as float32 `[2 * layers, n_tokens, kv_heads, head_dim]` (segment order)."""
    flat = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()).view(TORCH_DTYPES[geometry.dtype])
    return flat.reshape(_segments(geometry), n_tokens, geometry.kv_heads, geometry.head_dim).float()


def rotation_block(head_dim: int) -> int:
    """Channels fp8 rotates together: the largest power of two dividing head_dim, at most 64 (one
    matrix product of 64 per value: ~35 % more CPU decode time than unrotated, 17 to 23 ms per SmolLM2 block)."""
    return min(64, head_dim & -head_dim)


@functools.cache
def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    """The n x n orthonormal Walsh-Hadamard matrix (Sylvester's; symmetric, its own inverse)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    matrix: torch.Tensor = (h / n**0.5).float().to(device)
    return matrix


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """`x` (`[..., head_dim]`, float32) times the block-diagonal Hadamard matrix: the rotation, and its inverse."""
    d = x.shape[-1]
    b = rotation_block(d)
    if b == 1:
        return x
    return torch.matmul(x.reshape(*x.shape[:-1], d // b, b), _hadamard(b, x.device)).reshape(x.shape)


def key_shaping(moments: torch.Tensor) -> torch.Tensor:
    """From query second moments (`adapter.query_moments`, `[layers, kv_heads, D, D]`): the factors
    `encode` rounds keys with, float32 of the same shape. A key's error e moves the score q . k by
    q . e, so it costs e^T M e with M the queries' second moment; in the rotated space (where codes
    live) M' = R M R. Per head, U is the upper Cholesky factor of (M' + 1% of its mean diagonal)^-1:
    the inverse Hessian factor GPTQ carries rounding errors with (over a key's channels here)."""
    rotation = _rotate(torch.eye(moments.shape[-1], dtype=torch.float32)).double()
    weighted = rotation @ moments.double() @ rotation
    diagonal = weighted.diagonal(dim1=-2, dim2=-1)
    if not bool(torch.isfinite(weighted).all()) or bool((diagonal < 0).any()):
        raise InvalidArgument("query moments must be finite second moments (non-negative diagonal)")
    damp = (0.01 * diagonal.mean(dim=-1) + 1e-12)[..., None, None] * torch.eye(weighted.shape[-1], dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(weighted + damp))
    factor: torch.Tensor = torch.linalg.cholesky(inverse, upper=True).float()
    return factor


def _shaped(x: torch.Tensor, factor: torch.Tensor, snap: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Rotated keys `x` (`[layers, T, H, D]` float32) moved onto a codec's grid channel by channel:
    `snap(column, i)` puts channel i (`[layers, T, H]`) on its grid, and the error it leaves is
    carried into the channels after it through `factor` (`key_shaping`'s, `[layers, H, D, D]`), so
    the error that remains falls where queries hardly look (GPTQ's rounding, with the queries' second
    moment as Hessian). Encoding the result takes the codes it was snapped to."""
    work = x.clone()
    factor = factor.unsqueeze(1)  # [layers, 1, H, D, D]: the same for every token
    for i in range(x.shape[-1]):
        column = work[..., i]
        snapped = snap(column, i)
        error = (column - snapped).div_(factor[..., i, i])
        work[..., i + 1 :].addcmul_(error.unsqueeze(-1), factor[..., i, i + 1 :], value=-1)
        work[..., i] = snapped
    return work


@functools.cache
def _fp8_steps(device: torch.device) -> torch.Tensor:
    """2^(-c/4) for each 4-bit scale step c, float32 (computed in float64 and rounded once: the
    same table on every device)."""
    steps = [2.0 ** (-c / _FP8_STEPS_PER_OCTAVE) for c in range(_FP8_STEPS)]
    table: torch.Tensor = torch.tensor(steps, dtype=torch.float64).float().to(device)
    return table


def _key_trend(intercept: torch.Tensor, slope: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The line fp8 centres keys on, at token i of a block: slope * i + intercept per (head,
    channel), in float32, one multiply then one add (the same on every device). `intercept` and
    `slope` are bfloat16 `[..., H, D]`; the result broadcasts to `[..., n_tokens, H, D]`."""
    tokens = torch.arange(n_tokens, dtype=torch.float32, device=slope.device).view(n_tokens, 1, 1)
    return slope.float() * tokens + intercept.float()


def _encode_fp8(
    x: torch.Tensor, keys: bool, sink: torch.dtype | None, factor: torch.Tensor | None
) -> list[torch.Tensor]:
    """The arrays and codes of every layer's segment of one kind, `x` (`[layers, T, H, D]` float32),
    each array with the layers first. Keys are first centred on a line over the block's tokens per
    (head, channel): the least-squares fit (slope, then intercept, each rounded to bfloat16) over
    every token but a sink. Then rotated; per head a base scale (amax over the block / 448); per
    (token, head) a 4-bit step below it (scale = base * 2^(-step/4)): among the smallest that fits
    the token's values and the next ones up to an octave larger, the one whose codes err least; keys
    rounded by `_shaped` with a `factor`. With `sink` (the cache's dtype): the first token, exact in
    that dtype."""
    tiny = torch.finfo(torch.float32).tiny
    n = x.shape[1]
    first = x[:, :1].to(sink) if sink is not None else None
    trend: list[torch.Tensor] = []
    if keys:
        fit = x[:, 1:] if sink is not None else x
        at = torch.arange(n - fit.shape[1], n, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        slope = torch.zeros_like(x[:, :1])  # [layers, 1, H, D], as the decoder reads it
        if fit.shape[1] > 1:
            centred = at - at.mean()
            covariance = (fit - fit.mean(dim=1, keepdim=True)).mul_(centred).sum(dim=1, keepdim=True)
            slope = covariance / centred.square().sum()
        slope = slope.to(torch.bfloat16)
        intercept = (fit - slope.float() * at).mean(dim=1, keepdim=True) if fit.shape[1] else torch.zeros_like(slope)
        trend = [intercept.to(torch.bfloat16), slope]
        x = x - _key_trend(trend[0], slope, n)
    rotated = _rotate(x)
    amax = rotated.abs().amax(dim=-1)  # [layers, T, H]
    base = (amax.amax(dim=1, keepdim=True) / _FP8_MAX).clamp_min(tiny)  # [layers, 1, H]
    fits = torch.floor(torch.log2(base * _FP8_MAX / amax.clamp_min(tiny)) * _FP8_STEPS_PER_OCTAVE).nan_to_num()
    table = _fp8_steps(x.device)
    candidates, errors = [], []
    for k in range(_FP8_CANDIDATES):
        step = (fits - k).clamp(0, _FP8_STEPS - 1)
        scale = (base * table[step.long()]).unsqueeze(-1)  # [layers, T, H, 1], as the decoder computes it
        codes = (rotated / scale.clamp_min(tiny)).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        errors.append(_fp8_values(codes.view(torch.uint8)).mul_(scale).sub_(rotated).square_().sum(dim=-1))
        candidates.append(step)
    pick = torch.stack(errors).argmin(dim=0, keepdim=True)  # the first of equal errors: the smallest scale
    step = torch.stack(candidates).gather(0, pick)[0].to(torch.uint8)
    scale = (base * table[step.long()]).unsqueeze(-1).clamp_min(tiny)
    if factor is not None:
        rotated = _shaped(rotated, factor, lambda column, _: _fp8_rounded(column / scale[..., 0]) * scale[..., 0])
    codes = (rotated / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    steps = step.reshape(len(step), -1)
    steps = torch.cat((steps, steps.new_zeros(len(steps), steps.shape[1] % 2)), dim=1)  # two per byte, first low
    return [base, steps[:, 0::2] | (steps[:, 1::2] << 4), *trend, *([first] if first is not None else []), codes]


def _decode_fp8(body: torch.Tensor, geometry: Geometry, n_tokens: int, flags: int) -> torch.Tensor:
    """Every layer's keys at once, then every layer's values: codes times their (token, head)'s
    scale, rotated back, plus the keys' line, written in the cache's dtype; then the sink token."""
    h, d, n = geometry.kv_heads, geometry.head_dim, n_tokens
    sink = _sink_layout(geometry, flags)
    scales = [(torch.float32, (1, h, 1)), (torch.uint8, ((n * h + 1) // 2,))]
    line = [(torch.bfloat16, (1, h, d))] * 2
    out, kinds = _segment_kinds(body, "fp8", geometry, n_tokens, flags, ([*scales, *line, *sink], [*scales, *sink]))
    table = _fp8_steps(body.device)
    for keys, (segments, arrays, codes) in zip((True, False), kinds, strict=True):
        base, packed = arrays[0], arrays[1]
        step = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(len(packed), -1)[:, : n * h]
        scale = base * table[step.long()].view(-1, n, h, 1)
        values = _rotate(_fp8_values(codes).reshape(segments.shape).mul_(scale))
        if keys:
            values.add_(_key_trend(arrays[2], arrays[3], n))
        segments.copy_(values)  # float32, rounded once into the cache's dtype
        if sink:
            segments[:, :1].copy_(arrays[-1])
    return out


def _decode_fp8_per_channel(body: torch.Tensor, geometry: Geometry, n_tokens: int, rotated: bool) -> torch.Tensor:
    """fp8 blocks written before TOKEN_SCALED: one float32 scale per (segment, head, channel); all
    segments at once, one code lookup, one multiply and (rotated) one matrix product."""
    h, d, s = geometry.kv_heads, geometry.head_dim, _segments(geometry)
    rows = body.view(s, 4 * h * d + n_tokens * h * d)
    scales = _copied(rows[:, : 4 * h * d]).view(torch.float32).view(s, 1, h, d)
    values = _fp8_values(rows[:, 4 * h * d :]).reshape(s, n_tokens, h, d)
    out = torch.empty(s, n_tokens, h, d, dtype=TORCH_DTYPES[geometry.dtype], device=body.device)
    if not rotated:
        return torch.mul(values, scales, out=out)  # float32 product, rounded once into the cache's dtype
    return out.copy_(_rotate(values.mul_(scales)))  # rounded once into the cache's dtype


def _fits_float16(x: torch.Tensor, head_dim: int) -> bool:
    """Whether every rotated value of `x` (keys or values), and so every minimum and range over them, is
    well inside float16's range (a rotation of b channels grows a value at most sqrt(b)-fold): int4
    then stores its key statistics per group in float16 (GROUPED), else one float32 pair per block;
    its values' statistics are always float16."""
    return bool(x.abs().amax() * math.sqrt(rotation_block(head_dim)) < 30000)


def _encode_int4(
    x: torch.Tensor, keys: bool, sink: torch.dtype | None, factor: torch.Tensor | None, grouped: bool
) -> list[torch.Tensor]:
    """The arrays and codes of every layer's segment of one kind, `x` (`[layers, T, H, D]` float32),
    rotated first (keys then rounded by `_shaped` with a `factor`); with `sink` (the cache's dtype),
    the first token exact in that dtype (before the codes). Keys' minimum and step are per (head,
    channel) over the block's tokens, or `grouped` over each INT4_KEY_GROUP tokens in float16; values'
    per (token, head) over the head's channels in float16."""
    first = [x[:, :1].to(sink)] if sink is not None else []
    x = _rotate(x)
    if keys and grouped:
        parts = [x[:, at : at + INT4_KEY_GROUP] for at in range(0, x.shape[1], INT4_KEY_GROUP)]
        low = torch.cat([part.amin(dim=1, keepdim=True) for part in parts], dim=1)  # [layers, groups, H, D]
        high = torch.cat([part.amax(dim=1, keepdim=True) for part in parts], dim=1)
    else:
        dim = 1 if keys else 3  # keys: over tokens per channel; values: over channels per token
        low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    step = ((high - low) / 15).clamp_min(1e-8)
    half = grouped or not keys
    if half:
        low, step = low.half().float(), step.half().float().clamp_min(6e-5)
    stored = (low.half(), step.half()) if half else (low, step)
    if keys and grouped:
        low, step = _per_token(low, x.shape[1]), _per_token(step, x.shape[1])
    if factor is not None:
        x = _shaped(
            x, factor, lambda c, i: ((c - low[..., i]) / step[..., i]).round().clamp(0, 15) * step[..., i] + low[..., i]
        )
    codes = ((x - low) / step).round().clamp(0, 15).to(torch.uint8).reshape(len(x), -1)
    return [*stored, *first, codes[:, 0::2] | (codes[:, 1::2] << 4)]


def _per_token(groups: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Per-group key statistics (`[layers, groups, H, D]`) repeated for each of the n tokens."""
    return groups.repeat_interleave(INT4_KEY_GROUP, dim=1)[:, :n_tokens]


_Layout = Sequence[tuple[torch.dtype, tuple[int, ...]]]


def _sink_layout(geometry: Geometry, flags: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The array a SINK block's segments carry before their codes (fp8, int4): the block's first
    token, exact in the cache's dtype; none without the flag. Decoders write it over token 0."""
    return [(TORCH_DTYPES[geometry.dtype], (1, geometry.kv_heads, geometry.head_dim))] if flags & SINK else []


def _segment_kinds(
    body: torch.Tensor,
    codec: str,
    geometry: Geometry,
    n_tokens: int,
    flags: int,
    layouts: tuple[_Layout, _Layout],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]]:
    """A lossy body (fp8 with TOKEN_SCALED, int8, int4) taken apart: the cache to fill,
    `[2 * layers, n_tokens, kv_heads, head_dim]` in its dtype, and per kind (keys, then values) that
    cache's segments of the kind, the arrays that start each of their body segments (`layouts[kind]`:
    each array's dtype and per-layer shape, in order; viewed as `[layers, *shape]` in that dtype, to
    broadcast over the segments) and the codes after them (`[layers, bytes]` uint8)."""
    h, d, layers = geometry.kv_heads, geometry.head_dim, geometry.layers
    keys_bytes, values_bytes, _ = lossy_segment_bytes(codec, geometry, n_tokens, flags)
    rows = body.view(layers, keys_bytes + values_bytes)
    out = torch.empty(2 * layers, n_tokens, h, d, dtype=TORCH_DTYPES[geometry.dtype], device=body.device)
    kinds = []
    for segments, part, layout in (
        (out[0::2], rows[:, :keys_bytes], layouts[0]),
        (out[1::2], rows[:, keys_bytes:], layouts[1]),
    ):
        arrays, at = [], 0
        for dtype, shape in layout:
            size = math.prod(shape) * dtype.itemsize
            arrays.append(_copied(part[:, at : at + size]).view(dtype).view(layers, *shape))
            at += size
        kinds.append((segments, arrays, part[:, at:]))
    return out, kinds


def _decode_int4(body: torch.Tensor, geometry: Geometry, n_tokens: int, flags: int) -> torch.Tensor:
    """Every layer's keys at once, then every layer's values: minimum plus code times step, rotated
    back (ROTATED), written in the cache's dtype; then the sink token (SINK)."""
    h, d, n = geometry.kv_heads, geometry.head_dim, n_tokens
    sink = _sink_layout(geometry, flags)
    grouped = bool(flags & GROUPED)
    statistics = (torch.float16, (int4_key_groups(n), h, d)) if grouped else (torch.float32, (1, h, d))
    layouts = ([statistics] * 2 + sink, [(torch.float16, (n, h, 1))] * 2 + sink)
    out, kinds = _segment_kinds(body, "int4", geometry, n_tokens, flags, layouts)
    for kind, (segments, arrays, packed) in enumerate(kinds):
        low, step = arrays[0].float(), arrays[1].float()
        values = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(segments.shape).float()
        if grouped and kind == 0:  # each group of tokens with its own statistics
            for group, at in enumerate(range(0, n, INT4_KEY_GROUP)):
                values[:, at : at + INT4_KEY_GROUP].mul_(step[:, group : group + 1]).add_(low[:, group : group + 1])
        else:
            values.mul_(step).add_(low)
        # float32, rounded once into the cache's dtype (blocks written before the rotation: not rotated)
        segments.copy_(_rotate(values) if flags & ROTATED else values)
        if sink:
            segments[:, :1].copy_(arrays[-1])
    return out


def _encode_int8(x: torch.Tensor, keys: bool, factor: torch.Tensor | None) -> list[torch.Tensor]:
    """The arrays and codes of every layer's segment of one kind, `x` (`[layers, T, H, D]` float32),
    rotated first (keys then rounded by `_shaped` with a `factor`)."""
    x = _rotate(x)
    if keys:
        stored = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [., 1, H, D]
        scale = stored
    else:  # [layers, T, H, 1]; bfloat16 covers float32's range, so no value's scale overflows
        stored = (
            (x.abs().amax(dim=-1, keepdim=True) / 127).to(torch.bfloat16).clamp_min(torch.finfo(torch.bfloat16).tiny)
        )
        scale = stored.float()
    if factor is not None:
        x = _shaped(x, factor, lambda column, i: (column / scale[..., i]).round().clamp(-127, 127) * scale[..., i])
    return [stored, (x / scale).round().clamp(-127, 127).to(torch.int8)]


def _decode_int8(body: torch.Tensor, geometry: Geometry, n_tokens: int) -> torch.Tensor:
    """Every layer's keys at once, then every layer's values: codes times scales, rotated back,
    written in the cache's dtype."""
    h, d, n = geometry.kv_heads, geometry.head_dim, n_tokens
    layouts = ([(torch.float32, (1, h, d))], [(torch.bfloat16, (n, h, 1))])
    out, kinds = _segment_kinds(body, "int8", geometry, n_tokens, 0, layouts)
    for segments, (scale,), codes in kinds:
        values = codes.view(torch.int8).reshape(segments.shape).float().mul_(scale.float())
        segments.copy_(_rotate(values))  # float32, rounded once into the cache's dtype
    return out


# --- receiving --------------------------------------------------------------------------------------


class DecodingAssembler:
    """A frame target (kvcdn.wire.receiver.FrameTarget) for encoded blocks: frames land in a buffer of
    their block's encoded size, are decoded into `assembler`, and each block is handed on once it is
    complete, verified and decoded. Streams of different blocks decode in their own threads, in parallel. Blocks
    decoded on the host decode as they arrive: each verified frame (`frame_done`) decodes the lossless
    chunks it completes straight into the assembler's buffers, or the lossy block's layers it completes
    (at least an eighth of them at a time), so only the block's last part waits for its end.

    Where blocks decode (`on_device`, default `decodes_on_device`): on the CPU, into the assembler's
    host buffers (the cache, or staging for a GPU); or with torch ops where the cache lives: the
    encoded bytes land in pinned staging, are copied to the GPU on the assembler's side stream (2-4x
    fewer bytes than raw ones) and decoded there, in order with the copy, overlapping the network."""

    def __init__(self, assembler: KVAssembler, blocks: Sequence[pb.BlockInfo], on_device: bool | None = None) -> None:
        self.assembler = assembler
        self.device = assembler.device
        self._infos = {b.index * assembler.geometry.block_tokens: b for b in blocks}
        codecs = {b.codec or "raw" for b in blocks}
        self.on_device = on_device if on_device is not None else all(decodes_on_device(c, self.device) for c in codecs)
        if self.on_device and not codecs <= DEVICE_DECODED:
            raise InvalidArgument(f"only {', '.join(sorted(DEVICE_DECODED))} blocks decode on the device")
        self._encoded: dict[int, np.ndarray] = {}
        self._staged: dict[int, torch.Tensor] = {}
        """Host buffers of blocks being received (on_device: taken from the assembler's staging pool)."""
        self._held: list[torch.Tensor] = []
        """Staging whose copies to the device may still be in flight: given back by `layers`."""
        self._finite: list[torch.Tensor] = []
        """Per block decoded on the device, whether all its values are finite (checked by `layers`)."""
        self._planes: dict[int, _Planes] = {}
        """Lossless blocks being decoded as their frames are verified."""
        self._lossy_done: dict[int, int] = {}
        """Lossy blocks decoded on the host as their frames are verified: layers decoded so far."""

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        info = self._infos.get(block_start)
        if info is None or info.n_tokens != block_tokens or offset < 0 or offset + length > info.n_bytes:
            raise InvalidArgument("frame lies outside the encoded block being assembled")
        buffer = self._encoded.get(block_start)
        if buffer is None:
            pool = self.assembler.staging
            if self.on_device and pool is not None:
                staged = self._staged[block_start] = pool.take(info.n_bytes)
                buffer = staged.numpy()[: info.n_bytes]
            else:
                buffer = np.empty(info.n_bytes, dtype=np.uint8)
            self._encoded[block_start] = buffer
        return [buffer[offset : offset + length]]

    def write(self, block_start: int, block_tokens: int, offset: int, payload: memoryview) -> None:
        [region] = self.regions(block_start, block_tokens, offset, len(payload))
        region[:] = np.frombuffer(payload, dtype=np.uint8)

    def frame_done(self, block_start: int, block_tokens: int, end: int) -> None:
        """Bytes [0, end) of that block are written and verified: a lossless block decodes the chunks
        they hold, a lossy one decoded on the host the layers they hold (blocks decoded on the device
        wait for `block_done`)."""
        if end < _HEAD.size:  # the header has not arrived
            return
        if self._infos[block_start].codec == "lossless":
            self._lossless(block_start, block_tokens).feed(end - _HEAD.size)
        elif not self.on_device:
            self._lossy_layers(block_start, block_tokens, end)

    def _lossy_layers(self, block_start: int, block_tokens: int, end: int | None) -> None:
        """Decode on the host, into the assembler, the layers of a lossy block whose bytes lie in
        [0, end) (None: all the rest), once at least an eighth of the block's layers are new (a
        decode runs vectorised over the layers it is given)."""
        codec, geometry = self._infos[block_start].codec, self.assembler.geometry
        data = self._encoded[block_start]
        _, flags = _body(codec, geometry, block_tokens, data.data)
        keys, values, _ = lossy_segment_bytes(codec, geometry, block_tokens, flags)
        per_layer = keys + values
        done = self._lossy_done.get(block_start, 0)
        ready = geometry.layers if end is None else min(geometry.layers, (end - _HEAD.size) // per_layer)
        if ready <= done or (ready < geometry.layers and ready - done < max(1, geometry.layers // 8)):
            return
        body = torch.from_numpy(data[_HEAD.size + done * per_layer : _HEAD.size + ready * per_layer])
        part = dataclasses.replace(geometry, layers=ready - done)
        decoded = _decoded_bytes(codec, part, block_tokens, body, flags)
        self.assembler.write(block_start, block_tokens, 2 * done * geometry.segment_bytes(block_tokens), decoded.data)
        self._lossy_done[block_start] = ready

    def _lossless(self, block_start: int, block_tokens: int) -> _Planes:
        planes = self._planes.get(block_start)
        if planes is None:
            geometry = self.assembler.geometry
            body, flags = _body("lossless", geometry, block_tokens, self._encoded[block_start].data)

            def regions(offset: int, length: int) -> list[np.ndarray]:
                return self.assembler.regions(block_start, block_tokens, offset, length)

            planes = _Planes(body, geometry.block_bytes(block_tokens), geometry.element_bytes, flags, regions)
            self._planes[block_start] = planes
        return planes

    def block_done(self, block_start: int, block_tokens: int) -> None:
        info = self._infos[block_start]
        if info.codec == "lossless":
            self._lossless(block_start, block_tokens).finish()
            del self._planes[block_start], self._encoded[block_start]
            self.assembler.block_done(block_start, block_tokens)
            return
        geometry = self.assembler.geometry
        if not self.on_device:
            self._lossy_layers(block_start, block_tokens, None)
            del self._encoded[block_start]
            self._lossy_done.pop(block_start, None)
            self.assembler.block_done(block_start, block_tokens)
            return
        data = self._encoded.pop(block_start)
        _, flags = _body(info.codec, geometry, block_tokens, data.data)  # sizes and header, checked on the host
        staged = self._staged.pop(block_start, None)
        host = staged[: info.n_bytes] if staged is not None else torch.from_numpy(data)
        with self.assembler.copying():
            body = host[_HEAD.size :].to(self.device, non_blocking=True)
        with self.assembler.side_stream():
            values = decode_lossy(info.codec, geometry, block_tokens, body, flags)
            self._finite.append(_all_finite(values))
            self.assembler.land(block_start, block_tokens, values)
        if staged is not None:
            self._held.append(staged)

    def layers(self) -> list[LayerKV]:
        layers = self.assembler.layers()  # every copy and decode has run once this returns
        pool = self.assembler.staging
        while self._held:
            staged = self._held.pop()
            if pool is not None:
                pool.give(staged)
        if self._finite and not bool(torch.stack(self._finite).all()):
            raise DigestMismatch("a block decodes to non-finite values")
        return layers
