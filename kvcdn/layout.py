"""KV geometry and the block payload layout shared by the origin (which cuts blocks out of a prefill)
and the client (which writes streamed frames straight into preallocated tensors).

A block payload holds, for each layer l in order, keys[l] then values[l] of the block's tokens, each a
row-major array `[n_tokens, kv_heads, head_dim]` of the compute dtype. The client keeps one
token-major buffer per layer and tensor, shaped `[total_tokens, kv_heads, head_dim]`, so every
(layer, tensor) segment of a block is one contiguous byte range of its buffer: a frame is written with
one memcpy per segment it touches and no other copy. `KVAssembler.layers()` hands the buffers to
transformers as `[1, kv_heads, tokens, head_dim]` views (a permute, no copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcdn.errors import InvalidArgument
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["DTYPES", "Geometry", "KVAssembler", "LayerKV", "block_payload"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

DEFAULT_FRAME_BYTES = 1 << 20

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (keys, values), each `[batch=1, kv_heads, tokens, head_dim]`."""


@dataclass(frozen=True)
class Geometry:
    """Shape of a model's KV cache and how it is cut for the wire."""

    layers: int
    """Decoder layers; each contributes a keys and a values tensor."""
    kv_heads: int
    """Key/value heads per layer."""
    head_dim: int
    """Width of one head."""
    dtype: str
    """Compute dtype name, also the wire dtype (a key of DTYPES)."""
    block_tokens: int = 256
    """Tokens per block (the last block of a sequence may be short)."""
    frame_bytes: int = DEFAULT_FRAME_BYTES
    """Payload bytes per frame (the last frame of a block may be short)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("layers", "kv_heads", "head_dim", "block_tokens", "frame_bytes"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"geometry {name} must be positive")
        if self.frame_bytes > 3 << 20:
            raise InvalidArgument("frame_bytes must stay under 3 MiB (gRPC's 4 MiB message limit)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def token_bytes(self) -> int:
        """KV bytes one token costs across all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.element_bytes

    def segment_bytes(self, n_tokens: int) -> int:
        """Bytes of one (layer, tensor) segment of an n-token block."""
        return n_tokens * self.kv_heads * self.head_dim * self.element_bytes

    def block_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.token_bytes

    def frame_count(self, n_bytes: int) -> int:
        return -(-n_bytes // self.frame_bytes)

    def to_proto(self) -> pb.Geometry:
        return pb.Geometry(
            layers=self.layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            block_tokens=self.block_tokens,
            frame_bytes=self.frame_bytes,
        )

    @classmethod
    def from_proto(cls, msg: pb.Geometry) -> Geometry:
        return cls(
            layers=msg.layers,
            kv_heads=msg.kv_heads,
            head_dim=msg.head_dim,
            dtype=msg.dtype,
            block_tokens=msg.block_tokens,
            frame_bytes=msg.frame_bytes,
        )


def _u8(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor (works for bfloat16, which numpy lacks)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def block_payload(geometry: Geometry, layers: list[LayerKV], start: int, end: int) -> bytes:
    """The payload of the block holding tokens [start, end) of a prefilled cache."""
    n = end - start
    seg = geometry.segment_bytes(n)
    out = np.empty(geometry.block_bytes(n), dtype=np.uint8)
    pos = 0
    for keys, values in layers:
        for tensor in (keys, values):
            rows = tensor[0, :, start:end, :].transpose(0, 1).contiguous().cpu()
            out[pos : pos + seg] = _u8(rows)
            pos += seg
    return out.tobytes()


class KVAssembler:
    """Preallocated per-layer buffers that frames of consecutive blocks are written into in place."""

    def __init__(self, geometry: Geometry, n_tokens: int, device: torch.device) -> None:
        self.geometry = geometry
        self.n_tokens = n_tokens
        self.device = device
        pin = device.type == "cuda"
        shape = (n_tokens, geometry.kv_heads, geometry.head_dim)
        self._buffers = [
            torch.empty(shape, dtype=geometry.torch_dtype, pin_memory=pin) for _ in range(2 * geometry.layers)
        ]
        self._views = [_u8(b) for b in self._buffers]
        self._row_bytes = geometry.segment_bytes(1)

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        """Writable byte views of the buffers that bytes [offset, offset + length) of the block
        covering tokens [block_start, block_start + block_tokens) belong to, in payload order."""
        seg = self.geometry.segment_bytes(block_tokens)
        if block_start + block_tokens > self.n_tokens or offset < 0 or offset + length > seg * len(self._views):
            raise InvalidArgument("frame lies outside the cache being assembled")
        base = block_start * self._row_bytes
        out = []
        pos = offset
        end = offset + length
        while pos < end:
            index, within = divmod(pos, seg)
            take = min(seg - within, end - pos)
            out.append(self._views[index][base + within : base + within + take])
            pos += take
        return out

    def write(self, block_start: int, block_tokens: int, offset: int, payload: memoryview) -> None:
        """Copy `payload`, found at byte `offset` of the block covering tokens
        [block_start, block_start + block_tokens), into the buffers."""
        src = np.frombuffer(payload, dtype=np.uint8)
        pos = 0
        for region in self.regions(block_start, block_tokens, offset, len(src)):
            region[:] = src[pos : pos + len(region)]
            pos += len(region)

    def layers(self) -> list[LayerKV]:
        """Per-layer (keys, values) as `[1, kv_heads, n_tokens, head_dim]` views on the target device."""
        out: list[LayerKV] = []
        for i in range(0, len(self._buffers), 2):
            k, v = (
                b.to(self.device, non_blocking=True).permute(1, 0, 2).unsqueeze(0) for b in self._buffers[i : i + 2]
            )
            out.append((k, v))
        return out
