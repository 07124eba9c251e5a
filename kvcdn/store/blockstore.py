"""Content-addressed block files, used by the origin's store and the edge's disk tier.

A file is `KVB2 | u32 info length | u32 frame bytes | BlockInfo | payload`, written atomically
(kvcdn.store.files), so a crash never leaves a partial block under a valid name; leftover temporary files
are removed on open. Reads check the payload against every frame digest in the BlockInfo and drop a
file that fails (DATA_LOSS), so a corrupt block is never served; a store with a quarantine folder (the
origin's) moves the file there instead, for an operator to look at, and its owner recomputes the block.
"""

from __future__ import annotations

import contextlib
import struct
import time
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

    def __init__(self, root: Path, quarantine: Path | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_temporaries(self.root)
        self._infos: dict[bytes, pb.BlockInfo] = {}
        self.quarantine = quarantine
        """Where corrupt files are moved (None: they are deleted)."""
        self.quarantined = 0
        self._bytes: int | None = None
        """Bytes of every block file, once `size()` has counted them (then kept up to date)."""

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / f"{h}.blk"

    def __contains__(self, key: bytes) -> bool:
        """Whether the block's file is there (asked of the disk: another process sharing the folder,
        an origin worker, may have removed it)."""
        return self.path(key).exists()

    def forget(self, key: bytes) -> None:
        """Drop what is remembered of `key` (another process removed its file)."""
        self._infos.pop(key, None)

    def put(self, info: pb.BlockInfo, payload: bytes | memoryview | list[memoryview], frame_bytes: int) -> int:
        """Store a block whose payload is one buffer or consecutive pieces of it (an edge's frame
        payloads, written without joining them first); returns the file's size in bytes."""
        parts = payload if isinstance(payload, list) else [payload]
        body = info.SerializeToString()
        head = _HEAD.pack(_MAGIC, len(body), frame_bytes)
        replaced = self._file_bytes(info.key) if self._bytes is not None else 0
        atomic_write(self.path(info.key), head, body, *parts)
        self._infos[info.key] = info
        size = len(head) + len(body) + sum(len(p) for p in parts)
        if self._bytes is not None:
            self._bytes += size - replaced
        return size

    def _file_bytes(self, key: bytes) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def delete(self, key: bytes) -> None:
        if self._bytes is not None:
            self._bytes -= self._file_bytes(key)
        self.path(key).unlink(missing_ok=True)
        self._infos.pop(key, None)

    def size(self) -> int:
        """Bytes of every block file (counted on the first call, then kept as blocks come and go)."""
        if self._bytes is None:
            self._bytes = sum(f.size for f in self.files())
        return self._bytes

    def _drop_corrupt(self, key: bytes) -> str:
        """Delete, or quarantine, the file of `key`; says which happened."""
        if self.quarantine is None:
            self.delete(key)
            return "dropped"
        self.quarantine.mkdir(parents=True, exist_ok=True)
        if self._bytes is not None:
            self._bytes -= self._file_bytes(key)
        with contextlib.suppress(FileNotFoundError):
            self.path(key).rename(self.quarantine / f"{key.hex()}.{time.time_ns()}.blk")
        self._infos.pop(key, None)
        self.quarantined += 1
        return f"moved to {self.quarantine}"

    def info(self, key: bytes, fresh: bool = False) -> pb.BlockInfo | None:
        """The stored block's info (from its header only), or None when absent; `fresh`: read from the
        file even when remembered (another process sharing the folder may have rewritten it)."""
        cached = None if fresh else self._infos.get(key)
        if cached is not None:
            return cached
        try:
            with self.path(key).open("rb") as f:
                magic, length, _ = _HEAD.unpack(f.read(_HEAD.size))
                info = pb.BlockInfo.FromString(f.read(length)) if magic == _MAGIC else None
        except FileNotFoundError:
            self._infos.pop(key, None)
            return None
        except struct.error:
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
            where = self._drop_corrupt(key)
            raise DigestMismatch(f"stored block {key.hex()[:16]}… was corrupt and has been {where}")
        return info, payload, frame_bytes

    def files(self) -> list[BlockFile]:
        """Every block file below the root whose size matches its header (others are deleted, or
        quarantined)."""
        found: list[BlockFile] = []
        for path in self.root.glob("*/*.blk"):
            key = b""
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
                if len(key) == 32 and path == self.path(key):
                    self._drop_corrupt(key)
                else:
                    path.unlink(missing_ok=True)
                continue
            self._infos[key] = info
            found.append(BlockFile(key, stat.st_size, stat.st_mtime))
        return found
