"""Cache identity: the model fingerprint, the chained block keys and the frame digest.

Everything here is a pure function of its arguments: keys hash with SHA-256 over explicit
little-endian encodings, so two processes (or two machines) always agree on a key (never Python's
process-salted `hash()`); frames carry BLAKE3-256 digests, cryptographic and ~9 GB/s per core, so
verifying every frame costs almost nothing next to the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import blake3
import numpy as np

from kvcdn.errors import FingerprintMismatch, InvalidArgument, LimitExceeded

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "KEY_BYTES",
    "MAX_KEYS_PER_REQUEST",
    "block_keys",
    "block_spans",
    "check_read_request",
    "content_digest",
    "digest",
    "encoded_key",
    "fingerprint_json",
    "model_fingerprint",
    "pack_token_ids",
    "unpack_token_ids",
]

DEFAULT_BLOCK_TOKENS = 256
KEY_BYTES = 32
MAX_KEYS_PER_REQUEST = 4096
"""Block keys one LookupPrefix or StreamBlocks request may name (SPEC.md section 9)."""


def fingerprint_json(
    *,
    architecture: str,
    config: Mapping[str, Any],
    weights_digest: str,
    tokenizer_digest: str,
    dtype: str,
    attn_implementation: str,
) -> str:
    """The canonical JSON a model fingerprint hashes: sorted keys, no spaces, ASCII only, floats as
    Python writes them (shortest round-trip repr: `100000.0`, `1e-05`), anything else as `str()`."""
    return json.dumps(
        {
            "architecture": architecture,
            "config": config,
            "weights": weights_digest,
            "tokenizer": tokenizer_digest,
            "dtype": dtype,
            "attn_implementation": attn_implementation,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        default=str,
    )


def model_fingerprint(**inputs: Any) -> bytes:
    """SHA-256 over `fingerprint_json(**inputs)`: everything that changes the KV numbers."""
    return hashlib.sha256(fingerprint_json(**inputs).encode("ascii")).digest()


def pack_token_ids(ids: Sequence[int]) -> bytes:
    """Token ids as little-endian u32, as block keys and content digests hash them."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in an unsigned 32-bit integer")
    return arr.astype("<u4").tobytes()


def unpack_token_ids(data: bytes) -> list[int]:
    """The token ids `pack_token_ids` packed."""
    return [int(i) for i in np.frombuffer(data, dtype="<u4")]


def block_spans(n_tokens: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the blocks of an n-token sequence; the last may be short."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    return [(s, min(s + block_tokens, n_tokens)) for s in range(0, n_tokens, block_tokens)]


def block_keys(fingerprint: bytes, ids: Sequence[int], block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[bytes]:
    """Chained keys: key_0 = SHA-256(fingerprint || ids_0), key_i = SHA-256(key_{i-1} || ids_i)."""
    if len(fingerprint) != KEY_BYTES:
        raise ValueError("fingerprint must be 32 raw bytes")
    keys: list[bytes] = []
    prev = fingerprint
    for start, end in block_spans(len(ids), block_tokens):
        prev = hashlib.sha256(prev + pack_token_ids(ids[start:end])).digest()
        keys.append(prev)
    return keys


def encoded_key(key: bytes, codec: str) -> bytes:
    """The key of block `key` encoded with `codec` (kvcdn.model.codecs): the key itself for raw, else
    SHA-256(key || "kvcdn-codec:" || codec), so every encoding is a block of its own on the wire."""
    if codec in ("", "raw"):
        return key
    return hashlib.sha256(key + b"kvcdn-codec:" + codec.encode("ascii")).digest()


def content_digest(ids: Sequence[int]) -> str:
    """Hex SHA-256 of a token sequence as LE-u32: a document version's content identity."""
    return hashlib.sha256(pack_token_ids(ids)).hexdigest()


def digest(data: bytes | memoryview) -> bytes:
    """BLAKE3-256 of `data` (a frame's payload)."""
    return blake3.blake3(data).digest()


def check_read_request(asked_fingerprint: str, served_fingerprint: str, keys: Sequence[bytes]) -> None:
    """Validate a LookupPrefix/StreamBlocks request: FAILED_PRECONDITION unless the caller's model is
    the one this server's caches belong to; INVALID_ARGUMENT / RESOURCE_EXHAUSTED for bad keys."""
    if asked_fingerprint != served_fingerprint:
        raise FingerprintMismatch(
            f"this network serves caches of model fingerprint {served_fingerprint[:16]}…, the request is for "
            f"{asked_fingerprint[:16] or '(none)'}…: load the same model, dtype and attention implementation"
        )
    if not keys:
        raise InvalidArgument("the request names no block keys")
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise LimitExceeded(f"{len(keys)} keys in one request; the limit is {MAX_KEYS_PER_REQUEST}")
    if len(set(keys)) != len(keys):  # a chain never repeats a key; repeats would multiply the egress asked for
        raise InvalidArgument("the request names a block key more than once")
    for i, key in enumerate(keys):
        if len(key) != KEY_BYTES:
            raise InvalidArgument(f"key {i} is {len(key)} bytes; block keys are {KEY_BYTES} raw bytes")
