"""lossless (SPEC.md section 8): byte planes, each zstd-compressed where that pays, chunk by chunk
so a receiver decodes each chunk as soon as its bytes are verified. Bit-exact."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import zstandard

from kvcdn.errors import DigestMismatch
from kvcdn.model.codecs.container import header
from kvcdn.spec.codecs import CHUNKED, LOSSLESS_CHUNK_ELEMENTS, PLANE_HEADER_BYTES
from kvcdn.spec.geometry import Geometry

_PLANE = struct.Struct("<BI")
assert _PLANE.size == PLANE_HEADER_BYTES
_U16 = np.dtype("<u2")
"""A 16-bit value as lossless planes make it: plane 0 is its low byte."""
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


class Planes:
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


def encode(geometry: Geometry, n_tokens: int, payload: bytes | memoryview) -> bytes:
    return header("lossless", geometry, n_tokens, CHUNKED) + _encode_planes(payload, geometry.element_bytes)


def decode(geometry: Geometry, n_tokens: int, body: memoryview, flags: int) -> np.ndarray:
    """The payload a checked lossless body encodes, as uint8."""
    raw = geometry.block_bytes(n_tokens)
    out = np.empty(raw, dtype=np.uint8)
    Planes(body, raw, geometry.element_bytes, flags, lambda at, length: [out[at : at + length]]).finish()
    return out
