"""The origin's block work on its store, run in worker threads: reading a stored prefix back into
layers, storing the blocks of a prefill, storing a block's encodings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcdn.model.codecs import encode
from kvcdn.model.loading import LoadedModel
from kvcdn.model.receiving import KVAssembler
from kvcdn.model.tensors import LayerKV, block_payload
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.identity import encoded_key
from kvcdn.store.blockstore import BlockStore
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.frames import EncodedBlock, encode_block

__all__ = ["load_prefix", "mark_priced", "store_block", "store_encodings"]


def load_prefix(blocks: BlockStore, model: LoadedModel, keys: Sequence[bytes], n_tokens: int) -> list[LayerKV] | None:
    """The layers of the stored blocks `keys` (the first `n_tokens` of a document), on the model's
    device; None for no keys. DigestMismatch if one is corrupt (quarantined then)."""
    if not keys:
        return None
    geometry = model.geometry
    assembler = KVAssembler(geometry, n_tokens, model.device)
    for key in keys:
        info, payload, _ = blocks.get(key)
        assembler.write(info.index * geometry.block_tokens, info.n_tokens, 0, payload)
    return assembler.layers()


def store_block(
    blocks: BlockStore, geometry: Geometry, key: bytes, index: int, layers: list[LayerKV], start: int, end: int
) -> EncodedBlock | None:
    """Store the block of tokens [start, end) unless it is stored; the block if it was not."""
    if key in blocks:
        return None
    payload = block_payload(geometry, layers, start, end)
    block = encode_block(key, index, end - start, payload, geometry.frame_bytes)
    blocks.put(block.info, payload, geometry.frame_bytes)
    return block


def store_encodings(
    blocks: BlockStore, model: LoadedModel, keys: Sequence[bytes], codecs: Sequence[str], shaping: torch.Tensor | None
) -> None:
    """Store each block of `keys` encoded with each of `codecs` (lossy ones with the model's key
    `shaping`), where not stored yet."""
    geometry = model.geometry
    for key in keys:
        missing = [c for c in codecs if encoded_key(key, c) not in blocks]
        if not missing:
            continue
        info, payload, _ = blocks.get(key)
        for codec in missing:
            data = encode(codec, geometry, info.n_tokens, payload, info.index == 0, shaping, model.device)
            block = encode_block(
                encoded_key(key, codec), info.index, info.n_tokens, data, geometry.frame_bytes, codec, info.n_bytes
            )
            blocks.put(block.info, data, geometry.frame_bytes)


def mark_priced(infos: list[pb.BlockInfo], priced: set[bytes]) -> list[pb.BlockInfo]:
    """`infos`, those of `priced` keys as copies marked `priced` (BlockInfo.priced)."""
    if not priced:
        return infos
    out = []
    for info in infos:
        if info.key in priced:
            marked = pb.BlockInfo()
            marked.CopyFrom(info)
            marked.priced = True
            info = marked
        out.append(info)
    return out
