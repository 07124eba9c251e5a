"""Content-addressed block store and versioned manifest store on local disk.

Every file is written to a temporary name in its final folder, flushed, fsynced and renamed into
place, so a crash leaves either the old state or the complete new file, never a partial file under a
valid name; leftover temporary files are removed on open. Block files are `KVB1 | u32 info length |
BlockInfo | payload`, and reads check the payload against the BlockInfo's frame digests.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
from pathlib import Path

from kvcdn.errors import DigestMismatch, InvalidArgument, NotFound
from kvcdn.frames import digest
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["BlockStore", "ManifestStore", "check_document_name"]

_MAGIC = b"KVB1"
_HEAD = struct.Struct("<4sI")
_NAME = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")


def check_document_name(name: str) -> None:
    if not _NAME.match(name) or ".." in name.split("/"):
        raise InvalidArgument(
            f"document name {name!r} is invalid: use 1-200 letters, digits and '._-/', no '..' segment"
        )


def _atomic_write(path: Path, *chunks: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_temporaries(root: Path) -> None:
    for tmp in root.rglob(".tmp-*"):
        tmp.unlink(missing_ok=True)


class BlockStore:
    """Blocks by key: `put` once, `get` many times. Keys are the chained block keys."""

    def __init__(self, root: Path, frame_bytes: int) -> None:
        self.root = root / "blocks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.frame_bytes = frame_bytes
        _remove_temporaries(self.root)
        self._infos: dict[bytes, pb.BlockInfo] = {}

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / f"{h}.blk"

    def __contains__(self, key: bytes) -> bool:
        return key in self._infos or self._path(key).exists()

    def put(self, info: pb.BlockInfo, payload: bytes) -> None:
        body = info.SerializeToString()
        _atomic_write(self._path(info.key), _HEAD.pack(_MAGIC, len(body)), body, payload)
        self._infos[info.key] = info

    def info(self, key: bytes) -> pb.BlockInfo | None:
        """The stored block's info (from its header only), or None when absent."""
        cached = self._infos.get(key)
        if cached is not None:
            return cached
        try:
            with self._path(key).open("rb") as f:
                magic, length = _HEAD.unpack(f.read(_HEAD.size))
                info = pb.BlockInfo.FromString(f.read(length)) if magic == _MAGIC else None
        except (FileNotFoundError, struct.error):
            return None
        if info is not None:
            self._infos[key] = info
        return info

    def get(self, key: bytes) -> tuple[pb.BlockInfo, bytes]:
        """The block's info and payload, verified against its digests."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"block {key.hex()[:16]}… is not stored at the origin") from None
        magic, length = _HEAD.unpack_from(data)
        info = pb.BlockInfo.FromString(data[_HEAD.size : _HEAD.size + length])
        payload = data[_HEAD.size + length :]
        view = memoryview(payload)
        ok = magic == _MAGIC and info.key == key and len(payload) == info.n_bytes
        ok = ok and all(
            digest(view[i * self.frame_bytes : (i + 1) * self.frame_bytes]) == d
            for i, d in enumerate(info.frame_digests)
        )
        if not ok:
            self._path(key).unlink(missing_ok=True)
            self._infos.pop(key, None)
            raise DigestMismatch(f"stored block {key.hex()[:16]}… was corrupt and has been dropped")
        return info, payload


class ManifestStore:
    """Manifests by document name and version."""

    def __init__(self, root: Path) -> None:
        self.root = root / "manifests"
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(self.root)

    def _dir(self, document: str) -> Path:
        return self.root / hashlib.sha256(document.encode()).hexdigest()

    def versions(self, document: str) -> list[int]:
        d = self._dir(document)
        if not d.exists():
            return []
        return sorted(int(p.stem) for p in d.glob("*.manifest"))

    def put(self, manifest: pb.Manifest) -> None:
        _atomic_write(self._dir(manifest.document) / f"{manifest.version}.manifest", manifest.SerializeToString())

    def get(self, document: str, version: int = 0) -> pb.Manifest:
        """The manifest of `document` at `version` (0: the latest)."""
        check_document_name(document)
        versions = self.versions(document)
        if not versions:
            raise NotFound(f"document {document!r} has not been published")
        if version == 0:
            version = versions[-1]
        elif version not in versions:
            raise NotFound(f"document {document!r} has no version {version} (latest is {versions[-1]})")
        return pb.Manifest.FromString((self._dir(document) / f"{version}.manifest").read_bytes())
