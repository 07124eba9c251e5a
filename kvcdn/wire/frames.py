"""Wire framing of block payloads: digests, cutting, and zero-copy encode/decode of `Frame` messages.

A `Frame` is encoded by hand as exactly what protobuf itself would write (field 1, the small header
message, then field 2, the payload), so any protobuf client can parse it, while kvcdn's receivers
slice the payload out as a `memoryview` instead of copying it, and senders keep encoded frames ready
to write. The StreamBlocks method is registered with pass-through serializers for that reason
(kvcdn.wire.rpc), which the architecture measured at ~4x protobuf's speed for 1 MiB messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from google.protobuf.message import DecodeError

from kvcdn.errors import DigestMismatch, InvalidArgument
from kvcdn.spec.identity import digest
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = [
    "EncodedBlock",
    "Frame",
    "FrameSource",
    "as_bytes",
    "check_digest",
    "check_start_frame",
    "decode_frame",
    "encode_block",
    "encode_frame",
    "encode_stored",
    "expect_frame",
    "frame_parts",
    "frame_prefix",
    "payload_size",
    "stream_blocks",
    "verify_frame",
]

_HEADER_TAG = 0x0A  # field 1, length-delimited
_PAYLOAD_TAG = 0x12  # field 2, length-delimited

Frame: TypeAlias = bytes | bytearray | memoryview
"""An encoded `Frame` message: bytes, or a view of the buffer an edge received the block into in place
(kvcdn.edge.pulls: one buffer a block, no copy after the socket's)."""


def as_bytes(frame: Frame) -> bytes:
    """`frame` as gRPC sends it (bytes; a frame received in place is copied once here)."""
    return frame if isinstance(frame, bytes) else bytes(frame)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


@dataclass(frozen=True)
class EncodedBlock:
    """A block ready to stream: its info and its frames encoded as `Frame` messages."""

    info: pb.BlockInfo
    frames: tuple[Frame, ...]
    frame_bytes: int
    """Payload bytes per frame the block was cut into (the last frame may be shorter)."""

    @property
    def n_bytes(self) -> int:
        """Memory the encoded block holds (frames plus a small allowance for the info)."""
        return sum(len(f) for f in self.frames) + 64 * len(self.frames) + 128

    def payloads(self) -> list[memoryview]:
        """Zero-copy views of the frames' payloads, in order (the block's payload, in pieces)."""
        return [frame_parts(f)[1] for f in self.frames]

    async def frames_from(self, start: int) -> AsyncIterator[Frame]:
        check_start_frame(start, len(self.frames))
        for frame in self.frames[start:]:
            yield frame


class FrameSource(Protocol):
    """A block's frames in order: a whole EncodedBlock, or one still arriving (an edge's cut-through)."""

    def frames_from(self, start: int) -> AsyncIterator[Frame]: ...


def check_start_frame(start: int, n_frames: int) -> None:
    if start and start >= n_frames:
        raise InvalidArgument(f"start_frame {start} is past the {n_frames} frames of the block")


def encode_block(
    key: bytes, index: int, n_tokens: int, payload: bytes, frame_bytes: int, codec: str = "", raw_bytes: int = 0
) -> EncodedBlock:
    """Cut a block payload (raw, or encoded with `codec` from `raw_bytes`) into frames, digest each
    and encode them."""
    view = memoryview(payload)
    digests = [digest(view[offset : offset + frame_bytes]) for offset in range(0, len(payload), frame_bytes)]
    info = pb.BlockInfo(
        key=key,
        index=index,
        n_tokens=n_tokens,
        n_bytes=len(payload),
        frame_digests=digests,
        codec=codec,
        raw_bytes=raw_bytes,
    )
    return encode_stored(info, payload, frame_bytes)


def encode_stored(info: pb.BlockInfo, payload: bytes | memoryview, frame_bytes: int) -> EncodedBlock:
    """Encode the frames of a payload whose digests `info` already holds (checked when it was read)."""
    view = memoryview(payload)
    frames = [
        encode_frame(info, index, frame_bytes, view[offset : offset + frame_bytes])
        for index, offset in enumerate(range(0, len(payload), frame_bytes))
    ]
    return EncodedBlock(info=info, frames=tuple(frames), frame_bytes=frame_bytes)


def encode_frame(info: pb.BlockInfo, index: int, frame_bytes: int, chunk: bytes | memoryview) -> bytes:
    """Frame `index` of `info`'s block, whose payload is `chunk`, encoded as a `Frame` message."""
    return b"".join((frame_prefix(info, index, frame_bytes, len(chunk)), chunk))


def frame_prefix(info: pb.BlockInfo, index: int, frame_bytes: int, length: int) -> bytes:
    """What comes before the `length` payload bytes of frame `index` in its encoded `Frame`."""
    header = pb.FrameHeader(
        block_key=info.key, frame_index=index, offset=index * frame_bytes, digest=info.frame_digests[index]
    ).SerializeToString()
    return b"".join((bytes((_HEADER_TAG,)), _varint(len(header)), header, bytes((_PAYLOAD_TAG,)), _varint(length)))


def frame_parts(data: Frame) -> tuple[memoryview, memoryview]:
    """Zero-copy views of an encoded `Frame`'s serialized header and its payload, for frames written
    header first (as kvcdn writes them); ValueError for any other layout."""
    buf = memoryview(data)
    try:
        if buf[0] != _HEADER_TAG:
            raise ValueError("header first")
        n, pos = _read_varint(buf, 1)
        header = buf[pos : pos + n]
        pos += n
        if pos == len(buf):
            return header, buf[pos:]
        if buf[pos] != _PAYLOAD_TAG:
            raise ValueError("payload second")
        n, pos = _read_varint(buf, pos + 1)
    except IndexError:
        raise ValueError("truncated frame") from None
    if pos + n != len(buf):
        raise ValueError("trailing fields")
    return header, buf[pos : pos + n]


def payload_size(data: bytes) -> int:
    """Bytes of payload in an encoded frame, 0 for bytes that are not a frame written header first (for
    counting what a server sends; it never raises)."""
    try:
        return len(frame_parts(data)[1])
    except ValueError:
        return 0


def decode_frame(data: bytes, peer: str = "") -> tuple[pb.FrameHeader, memoryview]:
    """Split an encoded `Frame` into its header and a zero-copy view of its payload; DigestMismatch for
    bytes that are not a Frame at all (a faulty or hostile sender: the caller fails over)."""
    try:
        try:
            header, payload = frame_parts(data)
        except ValueError:
            # Another writer's field order: parse properly (copies the payload).
            frame = pb.Frame.FromString(data)
            return frame.header, memoryview(frame.payload)
        return pb.FrameHeader.FromString(bytes(header)), payload
    except DecodeError:
        raise DigestMismatch(f"{peer or 'the server'} sent {len(data)} bytes that are not a Frame") from None


def _block_name(info: pb.BlockInfo) -> str:
    return f"block {info.index} ({info.key.hex()[:16]}…)"


def expect_frame(
    info: pb.BlockInfo, frame_bytes: int, index: int, header: pb.FrameHeader, payload_len: int, peer: str = ""
) -> None:
    """The checks a receiver makes before it reads a payload: `header` announces frame `index` (the
    one due) of the block `info`, at its offset, with its published digest, and `payload_len` is that
    frame's size. DigestMismatch otherwise. The one verifier of every receiver: the bulk stream, gRPC
    streams and an edge's loads."""
    sender = peer or "the server"
    if header.block_key != info.key or header.frame_index != index or index >= len(info.frame_digests):
        raise DigestMismatch(
            f"{sender} sent frame {header.frame_index} of block {header.block_key.hex()[:16]}… where frame "
            f"{index} of {_block_name(info)} was due"
        )
    expected_len = min(frame_bytes, info.n_bytes - index * frame_bytes)
    if header.offset != index * frame_bytes or payload_len != expected_len:
        raise DigestMismatch(f"{sender} sent frame {index} of {_block_name(info)} with the wrong offset or size")
    if header.digest and header.digest != info.frame_digests[index]:
        raise DigestMismatch(f"{sender} sent frame {index} of {_block_name(info)} under another digest")


def check_digest(info: pb.BlockInfo, index: int, actual: bytes, peer: str = "") -> None:
    """DigestMismatch unless `actual`, the BLAKE3 of frame `index`'s payload, is the published one."""
    if actual != info.frame_digests[index]:
        raise DigestMismatch(
            f"frame {index} of {_block_name(info)} from {peer or 'the server'} fails its BLAKE3 digest"
        )


def verify_frame(
    info: pb.BlockInfo, frame_bytes: int, index: int, header: pb.FrameHeader, payload: memoryview, peer: str = ""
) -> None:
    """`expect_frame` and `check_digest` for a frame whose payload is already in memory."""
    expect_frame(info, frame_bytes, index, header, len(payload), peer)
    check_digest(info, index, digest(payload), peer)


async def stream_blocks(sources: AsyncIterator[FrameSource], start_frame: int) -> AsyncIterator[Frame]:
    """The encoded frames of each block `sources` yields, in order, from frame `start_frame` of the
    first (a server's tiers decide where each block comes from and how far ahead they load)."""
    first = True
    async for source in sources:
        async for frame in source.frames_from(start_frame if first else 0):
            yield frame
        first = False
