"""Wire framing: zero-copy frames are valid protobuf, and verification catches every tampering."""

from __future__ import annotations

import os

import pytest

from kvcdn.errors import DigestMismatch
from kvcdn.spec.identity import digest
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import decode_frame, encode_block, verify_frame

KEY = bytes(range(32))


def test_frames_cover_the_payload_and_parse_as_protobuf() -> None:
    payload = os.urandom(10_000)
    block = encode_block(KEY, 3, 7, payload, 4096)
    assert [len(d) for d in block.info.frame_digests] == [32, 32, 32]
    assert block.info.n_bytes == 10_000 and block.info.index == 3 and block.info.n_tokens == 7
    joined = b""
    for i, raw in enumerate(block.frames):
        header, view = decode_frame(raw)
        frame = pb.Frame.FromString(raw)  # any protobuf client reads the same message
        assert frame.header == header and frame.payload == bytes(view)
        assert header.frame_index == i and header.offset == i * 4096 and header.digest == digest(view)
        verify_frame(block.info, 4096, i, header, view)
        joined += bytes(view)
    assert joined == payload


def test_decoder_accepts_frames_serialized_by_protobuf_itself() -> None:
    frame = pb.Frame(payload=b"xyz", header=pb.FrameHeader(block_key=KEY, frame_index=0))
    header, view = decode_frame(frame.SerializeToString())
    assert header.block_key == KEY and bytes(view) == b"xyz"


@pytest.mark.parametrize("where", ["payload", "digest", "offset", "index", "key", "short", "not-due"])
def test_verification_rejects_tampered_frames(where: str) -> None:
    payload = os.urandom(9000)
    block = encode_block(KEY, 0, 4, payload, 4096)
    header, view = decode_frame(block.frames[1])
    data = bytearray(view)
    if where == "payload":
        data[17] ^= 1
    elif where == "digest":
        header.digest = digest(b"other")
        data[0] ^= 1
    elif where == "offset":
        header.offset += 1
    elif where == "index":
        header.frame_index = 5
    elif where == "key":
        header.block_key = bytes(32)
    elif where == "short":
        data = data[:-1]
    due = 2 if where == "not-due" else 1  # a valid frame 1 where frame 2 was due
    reason = {"payload": "BLAKE3", "digest": "another digest", "offset": "offset or size", "short": "offset or size"}
    with pytest.raises(DigestMismatch, match=reason.get(where, "was due")):
        verify_frame(block.info, 4096, due, header, memoryview(bytes(data)), "edge-x")


@pytest.mark.parametrize("garbage", [b"\x0a\xff", b"\xff\xff\xff", b"\x12\x05abc"])
def test_bytes_that_are_not_a_frame_are_a_typed_error_naming_the_sender(garbage: bytes) -> None:
    with pytest.raises(DigestMismatch, match="edge-x sent"):
        decode_frame(garbage, "edge-x")
