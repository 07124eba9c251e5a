"""Receiving a cache: the buffers verified frames are written into in place (`KVAssembler`) and the
decoding of encoded blocks as their frames arrive (`DecodingAssembler`), both staged on the host
through leases of a kvcdn.model.staging.StagingPool on a GPU. kvcdn.wire.receiver.FrameTarget is
the interface the transports write through.

The receiver keeps one token-major buffer per layer and tensor, shaped `[total_tokens, kv_heads,
head_dim]`, so every (layer, tensor) segment of a block is one contiguous byte range of its buffer: a
frame is written with one memcpy per segment it touches and no other copy. `KVAssembler.layers()`
hands the buffers to transformers as `[1, kv_heads, tokens, head_dim]` views (a permute, no copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.model import codecs
from kvcdn.model.codecs.lossless import Planes
from kvcdn.model.staging import Lease, StagingPool
from kvcdn.model.tensors import TORCH_DTYPES, LayerKV, u8
from kvcdn.spec.codecs import lossy_segment_bytes
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import block_spans
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["DecodingAssembler", "KVAssembler"]

_CudaStream: Any = torch.cuda.Stream  # partly annotated in torch
_CudaEvent: Any = torch.cuda.Event


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
        self._host: Lease | None = None
        """Staged: the lease on a buffer of the blocks' payloads back to back, in wire order (None: not
        staged, or released)."""
        self._views: list[np.ndarray] = []
        """Unstaged: the cache's buffers, one per (layer, tensor), as bytes."""
        shape = (n_tokens, geometry.kv_heads, geometry.head_dim)
        self._whole: torch.Tensor | None = None
        """Staged: the layers' buffers as one tensor `[2 * layers, n_tokens, kv_heads, head_dim]`, so a
        block lands with one copy kernel."""
        if staging is not None:
            if host_staging:
                self._host = staging.lease(n_tokens * geometry.token_bytes)
            self._whole = torch.empty((2 * geometry.layers, *shape), dtype=self._dtype, device=device)
            self._buffers = list(self._whole)
        else:
            # One allocation per (layer, tensor): the allocator recycles buffers of this size from
            # one fetch to the next, where one cache-sized allocation would be fresh pages each
            # time, faulted in by the receiving thread (3x slower fetches on two cores).
            self._buffers = [torch.empty(shape, dtype=self._dtype) for _ in range(2 * geometry.layers)]
            self._views = [u8(b) for b in self._buffers]
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
        if self._host is not None:
            base = block_start * self.geometry.token_bytes + offset
            return [self._host.buffer.numpy()[base : base + length]]
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
        if self._host is None:
            return
        base = block_start * self.geometry.token_bytes
        payload = self._host.buffer[base : base + self.geometry.block_bytes(block_tokens)]
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

    def close(self) -> None:
        """Wait for the copies queued so far and release the staging (after `layers()`, or when a
        fetch fails: its buffers go back to the pool, never to a later fetch while a copy reads them)."""
        if self._stream is not None:
            self._stream.synchronize()
        if self._host is not None:
            self._host.release()
            self._host = None

    def layers(self) -> list[LayerKV]:
        """Per-layer (keys, values) as `[1, kv_heads, n_tokens, head_dim]` views on the target device.
        Staged: copies what `block_done` did not, waits until every copy has landed and releases the
        staging; call it once, after the last frame."""
        if self.staging is not None:
            for start, end in block_spans(self.n_tokens, self.geometry.block_tokens):
                if start not in self._landed:
                    if self._host is None:
                        raise InvalidArgument(f"block at token {start} never landed on the device")
                    self.block_done(start, end - start)
            self.close()
            if self._copies:
                self.copy_s = sum(begin.elapsed_time(end) for begin, end in self._copies) / 1e3
        out: list[LayerKV] = []
        for i in range(0, len(self._buffers), 2):
            k, v = (b.permute(1, 0, 2).unsqueeze(0) for b in self._buffers[i : i + 2])
            out.append((k, v))
        return out


DEVICE_BATCH_BLOCKS = 8
"""DecodingAssembler: consecutive blocks decoded on the device with one set of torch ops."""


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
    fewer bytes than raw ones) as each block completes, and decoded there in order with the copies,
    `DEVICE_BATCH_BLOCKS` consecutive blocks at a time (the same batches whatever order they
    arrive in, so a device decodes a cache alike every time), overlapping the network."""

    def __init__(self, assembler: KVAssembler, blocks: Sequence[pb.BlockInfo], on_device: bool | None = None) -> None:
        self.assembler = assembler
        self.device = assembler.device
        self._infos = {b.index * assembler.geometry.block_tokens: b for b in blocks}
        names = {b.codec or "raw" for b in blocks}
        self.on_device = (
            on_device if on_device is not None else all(codecs.decodes_on_device(c, self.device) for c in names)
        )
        if self.on_device and not names <= codecs.DEVICE_DECODED:
            raise InvalidArgument(f"only {', '.join(sorted(codecs.DEVICE_DECODED))} blocks decode on the device")
        self._encoded: dict[int, np.ndarray] = {}
        self._staged: dict[int, Lease] = {}
        """Staging of blocks being received (on_device: leased from the assembler's staging pool)."""
        self._held: list[Lease] = []
        """Staging whose copies to the device may still be in flight: released by `close`."""
        self._finite: list[torch.Tensor] = []
        """Per block decoded on the device, whether all its values are finite (checked by `layers`)."""
        self._planes: dict[int, Planes] = {}
        """Lossless blocks being decoded as their frames are verified."""
        self._lossy_done: dict[int, int] = {}
        """Lossy blocks decoded on the host as their frames are verified: layers decoded so far."""
        starts = sorted(self._infos)
        self._batches = [starts[i : i + DEVICE_BATCH_BLOCKS] for i in range(0, len(starts), DEVICE_BATCH_BLOCKS)]
        self._batch_of = {start: i // DEVICE_BATCH_BLOCKS for i, start in enumerate(starts)}
        self._copied: dict[int, tuple[torch.Tensor, int]] = {}
        """Blocks copied to the device whose batch is not complete yet: their body and header flags."""
        self._lock = threading.Lock()

    def regions(self, block_start: int, block_tokens: int, offset: int, length: int) -> list[np.ndarray]:
        info = self._infos.get(block_start)
        if info is None or info.n_tokens != block_tokens or offset < 0 or offset + length > info.n_bytes:
            raise InvalidArgument("frame lies outside the encoded block being assembled")
        buffer = self._encoded.get(block_start)
        if buffer is None:
            pool = self.assembler.staging
            if self.on_device and pool is not None:
                staged = self._staged[block_start] = pool.lease(info.n_bytes)
                buffer = staged.buffer.numpy()[: info.n_bytes]
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
        if end < codecs.HEAD.size:  # the header has not arrived
            return
        if self._infos[block_start].codec == "lossless":
            self._lossless(block_start, block_tokens).feed(end - codecs.HEAD.size)
        elif not self.on_device:
            self._lossy_layers(block_start, block_tokens, end)

    def _lossy_layers(self, block_start: int, block_tokens: int, end: int | None) -> None:
        """Decode on the host, into the assembler, the layers of a lossy block whose bytes lie in
        [0, end) (None: all the rest), once at least an eighth of the block's layers are new (a
        decode runs vectorised over the layers it is given)."""
        codec, geometry = self._infos[block_start].codec, self.assembler.geometry
        data = self._encoded[block_start]
        _, flags = codecs.body(codec, geometry, block_tokens, data.data)
        keys, values, _ = lossy_segment_bytes(codec, geometry, block_tokens, flags)
        per_layer = keys + values
        done = self._lossy_done.get(block_start, 0)
        ready = geometry.layers if end is None else min(geometry.layers, (end - codecs.HEAD.size) // per_layer)
        if ready <= done or (ready < geometry.layers and ready - done < max(1, geometry.layers // 8)):
            return
        body = torch.from_numpy(data[codecs.HEAD.size + done * per_layer : codecs.HEAD.size + ready * per_layer])
        part = dataclasses.replace(geometry, layers=ready - done)
        decoded = codecs.decoded_bytes(codec, part, block_tokens, body, flags)
        self.assembler.write(block_start, block_tokens, 2 * done * geometry.segment_bytes(block_tokens), decoded.data)
        self._lossy_done[block_start] = ready

    def _lossless(self, block_start: int, block_tokens: int) -> Planes:
        planes = self._planes.get(block_start)
        if planes is None:
            geometry = self.assembler.geometry
            body, flags = codecs.body("lossless", geometry, block_tokens, self._encoded[block_start].data)

            def regions(offset: int, length: int) -> list[np.ndarray]:
                return self.assembler.regions(block_start, block_tokens, offset, length)

            planes = Planes(body, geometry.block_bytes(block_tokens), geometry.element_bytes, flags, regions)
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
        _, flags = codecs.body(info.codec, geometry, block_tokens, data.data)  # sizes and header, checked on the host
        staged = self._staged.pop(block_start, None)
        host = staged.buffer[: info.n_bytes] if staged is not None else torch.from_numpy(data)
        with self.assembler.copying():
            body = host[codecs.HEAD.size :].to(self.device, non_blocking=True)
        if staged is not None:
            self._held.append(staged)
        batch = self._batches[self._batch_of[block_start]]
        with self._lock:  # the thread that completes a batch decodes it
            self._copied[block_start] = (body, flags)
            if not all(start in self._copied for start in batch):
                return
            copied = [(start, *self._copied.pop(start)) for start in batch]
        self._decode(copied)

    def _decode(self, copied: list[tuple[int, torch.Tensor, int]]) -> None:
        """Decode blocks copied to the device, each run of them with the same codec, length and flags
        with one set of torch ops (bodies laid end to end are the body of a block of that many times
        the layers), and land them: each op a kernel launch while holding the GIL, which the
        receiving threads share, so a batch costs them about what one block did."""
        geometry = self.assembler.geometry
        segments = 2 * geometry.layers
        same = lambda c: (self._infos[c[0]].codec, self._infos[c[0]].n_tokens, c[2])  # noqa: E731
        for (codec, n_tokens, flags), group in itertools.groupby(copied, key=same):
            run = list(group)
            with self.assembler.side_stream():
                body = run[0][1] if len(run) == 1 else torch.cat([body for _, body, _ in run])
                part = dataclasses.replace(geometry, layers=geometry.layers * len(run))
                values = codecs.decode_lossy(codec, part, n_tokens, body, flags)
                self._finite.append(codecs.all_finite(values))
                for i, (start, _, _) in enumerate(run):
                    self.assembler.land(start, n_tokens, values[i * segments : (i + 1) * segments])

    def layers(self) -> list[LayerKV]:
        layers = self.assembler.layers()  # every copy and decode has run once this returns
        self.close()
        if self._finite and not bool(torch.stack(self._finite).all()):
            raise DigestMismatch("a block decodes to non-finite values")
        return layers

    def close(self) -> None:
        """Release every lease this fetch holds, once the copies that read them have run (see
        KVAssembler.close)."""
        self.assembler.close()
        while self._held:
            self._held.pop().release()
        while self._staged:
            self._staged.popitem()[1].release()
        self._copied.clear()


@contextlib.contextmanager
def _timed(events: list[tuple[Any, Any]], stream: Any) -> Iterator[None]:
    """Queue work on a CUDA stream between two timing events (appended to `events`)."""
    with torch.cuda.stream(stream):
        begin, end = _CudaEvent(enable_timing=True), _CudaEvent(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
    events.append((begin, end))
