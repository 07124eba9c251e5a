"""KV codec names and sizes: which encodings of a block payload exist and how large each may be.

Pure arithmetic (no torch): the clients' checks of what an edge announces and the flags of every
command use it; the encoders and decoders are kvcdn.model.codecs. An encoded block is a block of its
own, keyed `kvcdn.spec.identity.encoded_key(key, codec)`, whose `BlockInfo.codec` names the codec and
`raw_bytes` the decoded size; frames and digests cover the encoded bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvcdn.errors import InvalidArgument
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import encoded_key
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = [
    "CHUNKED",
    "CODECS",
    "DEFAULT_ACCEPT",
    "FLAGS",
    "GROUPED",
    "HEADER_BYTES",
    "INT4_KEY_GROUP",
    "LOSSLESS_CHUNK_ELEMENTS",
    "PLANE_HEADER_BYTES",
    "ROTATED",
    "SINK",
    "TOKEN_SCALED",
    "Codec",
    "best_prefix",
    "fixed_body_bytes",
    "int4_key_groups",
    "lossy_segment_bytes",
    "max_encoded_bytes",
    "parse_codecs",
]

HEADER_BYTES = 12
"""`KVC1 | u8 codec id | u8 element bytes | u16 flags | u32 n_tokens`, before every encoded body."""
PLANE_HEADER_BYTES = 5
"""`u8 method | u32 length` before each byte plane of a lossless body."""
LOSSLESS_CHUNK_ELEMENTS = 1 << 19
"""Elements per chunk of a lossless body (flag 1): each chunk's planes are coded on their own, so a
receiver decodes a chunk as soon as its bytes have arrived (1 MiB of bf16 values; smaller chunks
cost zstd more per byte: 2^18 decoded ~15 % slower here)."""

CHUNKED = 1
"""lossless header flag: planes are coded per chunk of LOSSLESS_CHUNK_ELEMENTS values."""
ROTATED = 1
"""fp8 and int4 header flag: each head's vector was Hadamard-rotated before quantizing (kvcdn.model.codecs)."""
TOKEN_SCALED = 2
"""fp8 header flag (with ROTATED): one scale per (token, head), keys centred per channel; without it
(blocks written before it existed), one float32 scale per (head, channel)."""
SINK = 4
"""fp8 (with TOKEN_SCALED) and int4 (with ROTATED) header flag: each segment also carries the block's
first token exactly (set on a document's first block, whose first token is the attention sink)."""
GROUPED = 8
"""int4 header flag (with ROTATED): keys' minimum and step per (head, channel) are float16, one pair
per group of INT4_KEY_GROUP tokens, instead of one float32 pair over the whole block."""
INT4_KEY_GROUP = 128
"""Tokens per group of int4's key statistics (GROUPED): two float16 groups cost what one float32
pair did in a 256-token block."""
FLAGS: dict[str, frozenset[int]] = {
    "lossless": frozenset({0, CHUNKED}),
    "fp8": frozenset({0, ROTATED, ROTATED | TOKEN_SCALED, ROTATED | TOKEN_SCALED | SINK}),
    "int4": frozenset({0, ROTATED, ROTATED | SINK, ROTATED | GROUPED, ROTATED | GROUPED | SINK}),
}
"""The header flags each codec's blocks may carry (others: 0 only)."""


@dataclass(frozen=True)
class Codec:
    name: str
    id: int
    exact: bool
    """Decodes to the very bytes it encoded (token-exact continuations stay exact)."""
    summary: str


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("raw", 0, True, "the payload as computed"),
        Codec("lossless", 1, True, "byte planes in chunks, zstd where it pays (bit-exact)"),
        Codec("fp8", 2, False, "float8 e4m3 after a Hadamard rotation, a scale per token, keys centred"),
        Codec("int4", 3, False, "4-bit after a Hadamard rotation, keys per channel, values per token (KIVI-style)"),
        Codec("int8", 4, False, "int8 after a Hadamard rotation, keys per channel, values per token"),
    )
}
DEFAULT_ACCEPT = ("lossless", "raw")
"""What a client accepts unless told otherwise: exact encodings only, the smaller first."""


def parse_codecs(names: str | Sequence[str], what: str = "--codecs", allow_empty: bool = False) -> tuple[str, ...]:
    """Codec names (a list, or comma-separated) as a tuple, after checking each is known and none repeats."""
    items = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    if (items or not allow_empty) and (
        any(n not in CODECS for n in items) or not items or len(set(items)) != len(items)
    ):
        raise InvalidArgument(
            f"{what} {','.join(items) or '(none)'} is not a list of distinct codecs from {', '.join(CODECS)}"
        )
    return tuple(items)


def lossy_segment_bytes(codec: str, geometry: Geometry, n_tokens: int, flags: int = 0) -> tuple[int, int, int]:
    """Bytes of a lossy encoding's keys segment, of its values segment, and of the codes in either
    (each segment is the arrays its codec's SPEC row names, then its codes), under header `flags`."""
    h, d = geometry.kv_heads, geometry.head_dim
    per_channel = h * d  # one scale (and, for int4, one minimum) per (head, channel)
    per_token = n_tokens * h  # one per (token, head)
    if codec == "fp8" and flags & TOKEN_SCALED:
        codes = n_tokens * h * d
        # a float32 base per head, a 4-bit scale step per (token, head), [the first token exact];
        # keys also a bfloat16 intercept and slope per (head, channel)
        both = 4 * h + (per_token + 1) // 2 + (geometry.element_bytes * per_channel if flags & SINK else 0) + codes
        return both + 2 * 2 * per_channel, both, codes
    if codec == "fp8":
        codes = n_tokens * h * d
        return 4 * per_channel + codes, 4 * per_channel + codes, codes
    if codec == "int8":
        codes = n_tokens * h * d
        return 4 * per_channel + codes, 2 * per_token + codes, codes
    if codec == "int4":
        codes = n_tokens * h * d // 2
        first = geometry.element_bytes * per_channel if flags & SINK else 0
        statistics = 2 * 2 * int4_key_groups(n_tokens) * per_channel if flags & GROUPED else 2 * 4 * per_channel
        return statistics + first + codes, 2 * 2 * per_token + first + codes, codes
    raise InvalidArgument(f"codec {codec!r} has no fixed size")


def int4_key_groups(n_tokens: int) -> int:
    """Groups of int4's key statistics in an n-token block (GROUPED): INT4_KEY_GROUP tokens each, the
    last one shorter."""
    return -(-n_tokens // INT4_KEY_GROUP)


def fixed_body_bytes(codec: str, geometry: Geometry, n_tokens: int, flags: int = 0) -> int:
    """The exact body size of a fixed-size (lossy) encoding of an n-token block with header `flags`."""
    keys, values, _ = lossy_segment_bytes(codec, geometry, n_tokens, flags)
    return geometry.layers * (keys + values)


def max_encoded_bytes(codec: str, geometry: Geometry, n_tokens: int) -> int:
    """The most bytes a valid `codec` encoding of an n-token block can take (receivers refuse more)."""
    raw = geometry.block_bytes(n_tokens)
    if codec in ("", "raw"):
        return raw
    if codec == "lossless":  # planes that did not pay are stored; zstd never adds more than this
        chunks = -(-raw // geometry.element_bytes // LOSSLESS_CHUNK_ELEMENTS)
        return HEADER_BYTES + raw + geometry.element_bytes * (chunks * (PLANE_HEADER_BYTES + 64) + raw // 100)
    return HEADER_BYTES + max(fixed_body_bytes(codec, geometry, n_tokens, f) for f in FLAGS.get(codec, {0}))


def best_prefix(
    keys: Sequence[bytes], codecs: Sequence[str], info_of: Callable[[bytes], pb.BlockInfo | None]
) -> list[pb.BlockInfo]:
    """The longest leading run of `keys`' blocks that `info_of` (encoded key -> info) knows, in the
    first of `codecs` (empty: raw) that reaches that length: how servers answer LookupPrefix."""
    best: list[pb.BlockInfo] = []
    for codec in codecs or ("raw",):
        found: list[pb.BlockInfo] = []
        for key in keys:
            info = info_of(encoded_key(key, codec))
            if info is None:
                break
            found.append(info)
        if len(found) > len(best):
            best = found
        if len(best) == len(keys):
            break
    return best
