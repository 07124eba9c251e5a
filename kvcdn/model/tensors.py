"""KV tensors <-> block payloads (kvcdn.spec.geometry has the layout): the origin cuts blocks out of a
prefill, and receivers write streamed frames straight into preallocated tensors.

The receiver keeps one token-major buffer per layer and tensor, shaped `[total_tokens, kv_heads,
head_dim]`, so every (layer, tensor) segment of a block is one contiguous byte range of its buffer: a
frame is written with one memcpy per segment it touches and no other copy. `KVAssembler.layers()` hands
the buffers to transformers as `[1, kv_heads, tokens, head_dim]` views (a permute, no copy).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcdn.errors import InvalidArgument
from kvcdn.spec.geometry import Geometry

__all__ = ["TORCH_DTYPES", "KVAssembler", "LayerKV", "block_payload", "synchronize"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The torch dtype of each kvcdn.spec.geometry.DTYPES name."""

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (keys, values), each `[batch=1, kv_heads, tokens, head_dim]`."""


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` has run: CUDA kernels and non-blocking copies return
    before they finish, so every timing that involves a GPU ends here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            torch.empty(shape, dtype=TORCH_DTYPES[geometry.dtype], pin_memory=pin) for _ in range(2 * geometry.layers)
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
        """Per-layer (keys, values) as `[1, kv_heads, n_tokens, head_dim]` views on the target device
        (copies to a GPU are queued, not finished: `synchronize` before timing)."""
        out: list[LayerKV] = []
        for i in range(0, len(self._buffers), 2):
            k, v = (
                b.to(self.device, non_blocking=True).permute(1, 0, 2).unsqueeze(0) for b in self._buffers[i : i + 2]
            )
            out.append((k, v))
        return out
