"""KV tensors <-> block payloads (kvcdn.spec.geometry has the layout): the origin cuts blocks out of a
prefill, and receivers write streamed frames straight into preallocated tensors.

The receiver keeps one token-major buffer per layer and tensor, shaped `[total_tokens, kv_heads,
head_dim]`, so every (layer, tensor) segment of a block is one contiguous byte range of its buffer: a
frame is written with one memcpy per segment it touches and no other copy. `KVAssembler.layers()` hands
the buffers to transformers as `[1, kv_heads, tokens, head_dim]` views (a permute, no copy).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvcdn.errors import InvalidArgument
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import block_spans

__all__ = ["TORCH_DTYPES", "KVAssembler", "LayerKV", "StagingPool", "bit_identical", "block_payload", "synchronize"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The torch dtype of each kvcdn.spec.geometry.DTYPES name."""

_CudaStream: Any = torch.cuda.Stream  # partly annotated in torch
_CudaEvent: Any = torch.cuda.Event

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (keys, values), each `[batch=1, kv_heads, tokens, head_dim]`."""


def bit_identical(layers: list[LayerKV], reference: list[LayerKV]) -> bool:
    """Whether `layers` equal the first tokens of `reference` (as many as they hold), bit for bit."""
    if len(layers) != len(reference):
        return False
    n = layers[0][0].shape[2] if layers else 0
    return all(
        torch.equal(k, rk[:, :, :n]) and torch.equal(v, rv[:, :, :n])
        for (k, v), (rk, rv) in zip(layers, reference, strict=True)
    )


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


_SLACK = 4
"""StagingPool: the largest buffer a request takes, as a multiple of what it asked for."""


class StagingPool:
    """Reusable host buffers for landing fetched caches on a GPU.

    Pinned (page-locked) host memory copies to a GPU at full speed (54 GB/s measured on an H100
    against 6 GB/s pageable) but pinning gigabytes costs more than the fetch it serves, so a client
    pins buffers once and reuses them: a fetch takes one, receives into it, copies each verified block
    to the GPU, and gives it back once the last copy has landed. Thread-safe.
    """

    def __init__(self, pin: bool = True, keep_bytes: int = 8 << 30) -> None:
        self.pin = pin
        self.keep_bytes = keep_bytes
        """Free buffers kept beyond this many bytes are released."""
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocations = 0
        """Buffers allocated so far (the rest were reused)."""

    def take(self, n_bytes: int) -> torch.Tensor:
        """A uint8 host buffer of at least `n_bytes`: the smallest free one that fits and is at most
        `_SLACK` times that, else a new one (an encoded block's few MB must not take, and hold, the
        buffer a whole raw cache lands in)."""
        with self._lock:
            fits = [b for b in self._free if n_bytes <= b.numel() <= _SLACK * n_bytes]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                # By identity: list.remove would compare tensors with ==, elementwise (and raise
                # for two buffers of different sizes).
                del self._free[next(i for i, b in enumerate(self._free) if b is buf)]
                return buf
            self.allocations += 1
        return torch.empty(n_bytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer taken from this pool (no copy from it may still be in flight)."""
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel(), reverse=True)
            while sum(b.numel() for b in self._free) > self.keep_bytes:
                self._free.pop()  # the smallest go first: big fetches keep their buffers

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)


class KVAssembler:
    """Buffers that frames of consecutive blocks are written into in place.

    On the CPU the buffers are the cache itself: one token-major buffer per layer and tensor, so a
    frame is written with one memcpy per (layer, tensor) segment it touches and no other copy. With
    `staging` (always on a GPU), frames land instead in one host buffer laid out as the wire sends
    it, block after block (a frame is one contiguous region, received with one read), and each
    complete, verified block is copied to the device whole and scattered there into the layers'
    buffers by one copy kernel (`block_done`), on a side stream, overlapping the network; `layers()`
    returns once the last copy has landed. Blocks decoded on the device arrive instead as tensors
    (`land`); a cache whose blocks all arrive so takes no host staging (`host_staging`)."""

    def __init__(
        self,
        geometry: Geometry,
        n_tokens: int,
        device: torch.device,
        staging: StagingPool | None = None,
        host_staging: bool = True,
    ) -> None:
        self.geometry = geometry
        self.n_tokens = n_tokens
        self.device = device
        self._dtype = TORCH_DTYPES[geometry.dtype]
        self._row_bytes = geometry.segment_bytes(1)
        self._stream: Any = _CudaStream(device) if device.type == "cuda" else None
        """The side stream of the copies to a GPU (None on the CPU: copies run in the caller's thread)."""
        if device.type == "cuda" and staging is None:
            staging = StagingPool(keep_bytes=0)
        self.staging = staging
        """Where host staging comes from and goes back to (None: the CPU buffers are the cache)."""
        self._host_block: torch.Tensor | None = None
        """Staged: the blocks' payloads back to back, in wire order (None: not staged, or given back)."""
        self._views: list[np.ndarray] = []
        """Unstaged: the cache's buffers, one per (layer, tensor), as bytes."""
        shape = (n_tokens, geometry.kv_heads, geometry.head_dim)
        self._whole: torch.Tensor | None = None
        """Staged: the layers' buffers as one tensor `[2 * layers, n_tokens, kv_heads, head_dim]`, so a
        block lands with one copy kernel."""
        if staging is not None:
            if host_staging:
                self._host_block = staging.take(n_tokens * geometry.token_bytes)
            self._whole = torch.empty((2 * geometry.layers, *shape), dtype=self._dtype, device=device)
            self._buffers = list(self._whole)
        else:
            # One allocation per (layer, tensor): the allocator recycles buffers of this size from
            # one fetch to the next, where one cache-sized allocation would be fresh pages each
            # time, faulted in by the receiving thread (3x slower fetches on two cores).
            self._buffers = [torch.empty(shape, dtype=self._dtype) for _ in range(2 * geometry.layers)]
            self._views = [_u8(b) for b in self._buffers]
        self._landed: set[int] = set()
        """Block starts (token index) already copied to the device."""
        self._copies: list[tuple[Any, Any]] = []
        """CUDA events around each copy to the device (what `copy_s` sums)."""
        self.copy_s = 0.0
        """Seconds the device spent copying this cache's bytes from the host (set by `layers()`)."""

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        """Writable byte views of the buffers that bytes [offset, offset + length) of the block
        covering tokens [block_start, block_start + block_tokens) belong to, in payload order."""
        block_bytes = self.geometry.block_bytes(block_tokens)
        if block_start + block_tokens > self.n_tokens or offset < 0 or length < 0 or offset + length > block_bytes:
            raise InvalidArgument("frame lies outside the cache being assembled")
        if self._host_block is not None:
            base = block_start * self.geometry.token_bytes + offset
            return [self._host_block.numpy()[base : base + length]]
        if not self._views:
            raise InvalidArgument("this cache has no host staging: its blocks are decoded on the device (land)")
        seg = self.geometry.segment_bytes(block_tokens)
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

    def frame_done(self, block_start: int, block_tokens: int, end: int) -> None:
        """Bytes [0, end) of that block are written and verified (raw blocks wait for `block_done`)."""

    def copying(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a copy from the host to the device: on the side stream, timed (`copy_s`)."""
        return _timed(self._copies, self._stream) if self._stream is not None else contextlib.nullcontext()

    def block_done(self, block_start: int, block_tokens: int) -> None:
        """The block's frames are all written and verified: staged, copy it to the device whole and
        scatter it into the layers there (unstaged: nothing to do, the buffers are the cache)."""
        if self._host_block is None:
            return
        base = block_start * self.geometry.token_bytes
        payload = self._host_block[base : base + self.geometry.block_bytes(block_tokens)]
        with self.copying():
            moved = payload.to(self.device, non_blocking=True)
        shape = (2 * self.geometry.layers, block_tokens, self.geometry.kv_heads, self.geometry.head_dim)
        self.land(block_start, block_tokens, moved.view(self._dtype).view(shape))

    def side_stream(self) -> contextlib.AbstractContextManager[Any]:
        """The context that queues work on the side stream of the copies (nothing on the CPU), so work
        on a block (a device decode) runs in order with its copy, off the model's stream."""
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def land(self, block_start: int, block_tokens: int, segments: torch.Tensor) -> None:
        """Write a block on the device, `[2 * layers, block_tokens, kv_heads, head_dim]` in the cache's
        dtype, into place (on the side stream, in order with the copy or decode that produced it)."""
        if block_start + block_tokens > self.n_tokens or segments.shape != (
            len(self._buffers),
            block_tokens,
            *self._buffers[0].shape[1:],
        ):
            raise InvalidArgument("decoded block does not fit the cache being assembled")
        end = block_start + block_tokens
        with self.side_stream():
            if self._whole is not None:
                self._whole[:, block_start:end].copy_(segments)
            else:
                for segment, buffer in zip(segments, self._buffers, strict=True):
                    buffer[block_start:end].copy_(segment)
        self._landed.add(block_start)

    def layers(self) -> list[LayerKV]:
        """Per-layer (keys, values) as `[1, kv_heads, n_tokens, head_dim]` views on the target device.
        Staged: copies what `block_done` did not, waits until every copy has landed and gives the
        staging buffer back; call it once, after the last frame."""
        if self.staging is not None:
            for start, end in block_spans(self.n_tokens, self.geometry.block_tokens):
                if start not in self._landed:
                    if self._host_block is None:
                        raise InvalidArgument(f"block at token {start} never landed on the device")
                    self.block_done(start, end - start)
            if self._stream is not None:
                self._stream.synchronize()
                self.copy_s = sum(begin.elapsed_time(end) for begin, end in self._copies) / 1e3
            if self._host_block is not None:
                self.staging.give(self._host_block)
                self._host_block = None
        out: list[LayerKV] = []
        for i in range(0, len(self._buffers), 2):
            k, v = (b.permute(1, 0, 2).unsqueeze(0) for b in self._buffers[i : i + 2])
            out.append((k, v))
        return out


@contextlib.contextmanager
def _timed(events: list[tuple[Any, Any]], stream: Any) -> Iterator[None]:
    """Queue work on a CUDA stream between two timing events (appended to `events`)."""
    with torch.cuda.stream(stream):
        begin, end = _CudaEvent(enable_timing=True), _CudaEvent(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
    events.append((begin, end))
