"""Checks of what an edge answers a client, before anything of it is used: an answer that fails one
is DigestMismatch, and the client asks the next edge (kvcdn.client.api)."""

from __future__ import annotations

from collections.abc import Sequence

from kvcdn.errors import DigestMismatch
from kvcdn.spec.codecs import max_encoded_bytes
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import block_keys, content_digest, encoded_key
from kvcdn.spec.provenance import TrustStore
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["check_lookup", "check_manifest"]


def check_lookup(
    blocks: list[pb.BlockInfo],
    keys: list[bytes],
    accepted: Sequence[str],
    geometry: Geometry,
    n_ids: int,
    fingerprint: bytes,
    edge: str,
    trust: TrustStore | None,
) -> None:
    """DigestMismatch unless a lookup answer is well formed for this sequence in an accepted
    encoding, and (with `trust`) every block is signed by a trusted publisher."""
    codec = (blocks[0].codec or "raw") if blocks else accepted[0]
    if codec not in accepted:
        raise DigestMismatch(f"{edge} answered a lookup in {codec}, which this client did not accept")
    for i, info in enumerate(blocks):
        tokens = min(geometry.block_tokens, n_ids - i * geometry.block_tokens)
        raw = geometry.block_bytes(tokens)
        if (
            i >= len(keys)
            or info.key != encoded_key(keys[i], codec)
            or info.index != i
            or info.n_tokens != tokens
            or (info.codec or "raw") != codec
            or info.raw_bytes != (0 if codec == "raw" else raw)
            or not 0 < info.n_bytes <= max_encoded_bytes(codec, geometry, tokens)
            or (codec == "raw" and info.n_bytes != raw)
            or len(info.frame_digests) != geometry.frame_count(info.n_bytes)
        ):
            raise DigestMismatch(f"{edge} answered a lookup with a malformed block {i} ({codec})")
        if trust is not None:
            trust.check_block(fingerprint, info, edge)


def check_manifest(manifest: pb.Manifest, document: str, version: int, sender: str) -> None:
    """DigestMismatch unless `manifest` is the one asked for (name; version, when asked by number) and
    its token ids, when it carries them, are those its content digest and block keys were made from
    (SPEC section 4): a signature covers the digest and the keys, not the ids themselves."""
    what = f"{sender} answered a request for {document!r}" + (f" v{version}" if version else "")
    if manifest.document != document or (version and manifest.version != version):
        raise DigestMismatch(f"{what} with the manifest of {manifest.document!r} v{manifest.version}")
    if not manifest.token_ids:
        return
    ids = list(manifest.token_ids)
    try:
        fingerprint = bytes.fromhex(manifest.fingerprint)
    except ValueError:
        raise DigestMismatch(f"{what} with a manifest whose fingerprint is not hex") from None
    keys = block_keys(fingerprint, ids, manifest.geometry.block_tokens) if manifest.geometry.block_tokens else []
    if (
        content_digest(ids) != manifest.content_digest
        or len(ids) != manifest.token_count
        or keys != [b.key for b in manifest.blocks]
    ):
        raise DigestMismatch(f"{what} with token ids that are not those its digest and block keys were made from")
