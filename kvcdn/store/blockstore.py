"""Content-addressed block files, used by the origin's store and the edge's disk tier.

A file is `KVB2 | u32 info length | u32 frame bytes | BlockInfo | payload`, written atomically
(kvcdn.store.files), so a crash never leaves a partial block under a valid name; leftover temporary files
are removed on open. Reads check the payload against every frame digest in the BlockInfo and drop a
file that fails (DATA_LOSS), so a corrupt block is never served.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from kvcdn.errors import DigestMismatch, NotFound
from kvcdn.spec.identity import digest
from kvcdn.store.files import atomic_write, remove_temporaries
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["BlockFile", "BlockStore"]

_MAGIC = b"KVB2"
_HEAD = struct.Struct("<4sII")


@dataclass(frozen=True)
class BlockFile:
    """A block file found on disk: its key, size in bytes and modification time."""

    key: bytes
    size: int
    mtime: float


class BlockStore:
    """Blocks by key in a folder tree (`root/ab/abcd….blk`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_temporaries(self.root)
        self._infos: dict[bytes, pb.BlockInfo] = {}

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / f"{h}.blk"

    def __contains__(self, key: bytes) -> bool:
        return key in self._infos or self.path(key).exists()

    def put(self, info: pb.BlockInfo, payload: bytes | memoryview | list[memoryview], frame_bytes: int) -> int:
        """Store a block whose payload is one buffer or consecutive pieces of it (an edge's frame
        payloads, written without joining them first); returns the file's size in bytes."""
        parts = payload if isinstance(payload, list) else [payload]
        body = info.SerializeToString()
        head = _HEAD.pack(_MAGIC, len(body), frame_bytes)
        atomic_write(self.path(info.key), head, body, *parts)
        self._infos[info.key] = info
        return len(head) + len(body) + sum(len(p) for p in parts)

    def delete(self, key: bytes) -> None:
        self.path(key).unlink(missing_ok=True)
        self._infos.pop(key, None)

    def info(self, key: bytes) -> pb.BlockInfo | None:
        """The stored block's info (from its header only), or None when absent."""
        cached = self._infos.get(key)
        if cached is not None:
            return cached
        try:
            with self.path(key).open("rb") as f:
                magic, length, _ = _HEAD.unpack(f.read(_HEAD.size))
                info = pb.BlockInfo.FromString(f.read(length)) if magic == _MAGIC else None
        except (FileNotFoundError, struct.error):
            return None
        if info is not None:
            self._infos[key] = info
        return info

    def get(self, key: bytes) -> tuple[pb.BlockInfo, memoryview, int]:
        """The block's info, payload (a view into the file's bytes, not a copy) and frame size,
        verified against its digests."""
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"block {key.hex()[:16]}… is not stored here") from None
        try:
            magic, length, frame_bytes = _HEAD.unpack_from(data)
            info = pb.BlockInfo.FromString(data[_HEAD.size : _HEAD.size + length])
        except Exception:
            magic, info, frame_bytes = b"", pb.BlockInfo(), 0
        payload = memoryview(data)[_HEAD.size + length :] if magic == _MAGIC else memoryview(b"")
        ok = magic == _MAGIC and info.key == key and len(payload) == info.n_bytes and frame_bytes > 0
        ok = ok and len(info.frame_digests) == -(-info.n_bytes // frame_bytes)
        ok = ok and all(
            digest(payload[i * frame_bytes : (i + 1) * frame_bytes]) == d for i, d in enumerate(info.frame_digests)
        )
        if not ok:
            self.delete(key)
            raise DigestMismatch(f"stored block {key.hex()[:16]}… was corrupt and has been dropped")
        return info, payload, frame_bytes

    def files(self) -> list[BlockFile]:
        """Every block file below the root whose size matches its header (others are deleted)."""
        found: list[BlockFile] = []
        for path in self.root.glob("*/*.blk"):
            try:
                key = bytes.fromhex(path.stem)
                stat = path.stat()
                with path.open("rb") as f:
                    magic, length, _ = _HEAD.unpack(f.read(_HEAD.size))
                    info = pb.BlockInfo.FromString(f.read(length))
                complete = magic == _MAGIC and info.key == key and stat.st_size == _HEAD.size + length + info.n_bytes
            except Exception:
                complete = False
            if not complete:
                path.unlink(missing_ok=True)
                continue
            self._infos[key] = info
            found.append(BlockFile(key, stat.st_size, stat.st_mtime))
        return found
