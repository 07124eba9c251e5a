"""KV geometry: the shape of a model's cache and how it is cut into blocks and frames for the wire.

A block payload holds, for each layer l in order, keys[l] then values[l] of the block's tokens, each a
row-major array `[n_tokens, kv_heads, head_dim]` of the compute dtype (which is also the wire dtype).
Pure arithmetic: no torch here, so the processes that only move bytes (edges) never import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcdn.errors import InvalidArgument
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["DEFAULT_FRAME_BYTES", "DTYPES", "Geometry", "check_frame_bytes"]

DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Compute (and wire) dtypes by name, with their element size in bytes."""

DEFAULT_FRAME_BYTES = 1 << 20
MAX_FRAME_BYTES = 3 << 20
"""The largest frame payload: a frame and its header must fit one 4 MiB gRPC message."""


def check_frame_bytes(frame_bytes: int, what: str = "frame_bytes") -> int:
    """`frame_bytes`, once it is a frame payload size servers accept (else InvalidArgument naming `what`)."""
    if not 0 < frame_bytes <= MAX_FRAME_BYTES:
        raise InvalidArgument(f"{what} must be positive and at most 3 MiB (gRPC's 4 MiB message limit)")
    return frame_bytes


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
        for name in ("layers", "kv_heads", "head_dim", "block_tokens"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"geometry {name} must be positive")
        check_frame_bytes(self.frame_bytes)

    @property
    def element_bytes(self) -> int:
        return DTYPES[self.dtype]

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
