"""The origin's versioned manifest store on local disk (blocks live in a kvcdn.store.blockstore.BlockStore).

Every manifest is written atomically (kvcdn.store.files); leftover temporary files are removed on open.
An index kept in memory (built from the manifests on open) says which manifests use each stored block
key, so a purge finds the blocks it orphans without reading every manifest, and a corrupt block finds
a document to recompute it from.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from kvcdn.errors import InvalidArgument, NotFound
from kvcdn.spec.identity import encoded_key
from kvcdn.store.files import atomic_write, remove_temporaries
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["EventLog", "ManifestStore", "check_document_name", "stored_keys"]

Version = tuple[str, int]
"""(document, version)."""


def stored_keys(manifest: pb.Manifest) -> list[bytes]:
    """Every block key a manifest's document is stored under: raw and each offered encoding."""
    return [encoded_key(b.key, c) for b in manifest.blocks for c in ("raw", *manifest.codecs)]


_NAME = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def check_document_name(name: str) -> None:
    if not _NAME.fullmatch(name) or ".." in name.split("/"):
        raise InvalidArgument(
            f"document name {name!r} is invalid: use 1-200 letters, digits and '._-/', no '..' segment"
        )


class ManifestStore:
    """Manifests by document name and version."""

    def __init__(self, root: Path) -> None:
        self.root = root / "manifests"
        self.root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.root)
        self._users: dict[bytes, set[Version]] = {}
        for path in self.root.glob("*/*.manifest"):
            self._index(pb.Manifest.FromString(path.read_bytes()))

    def _index(self, manifest: pb.Manifest) -> None:
        for key in stored_keys(manifest):
            self._users.setdefault(key, set()).add((manifest.document, manifest.version))

    def users(self, key: bytes) -> list[Version]:
        """The (document, version) pairs whose manifests use the stored block `key`, oldest first."""
        return sorted(self._users.get(key, ()))

    def _dir(self, document: str) -> Path:
        return self.root / hashlib.sha256(document.encode()).hexdigest()

    def versions(self, document: str) -> list[int]:
        d = self._dir(document)
        if not d.exists():
            return []
        return sorted(int(p.stem) for p in d.glob("*.manifest"))

    def put(self, manifest: pb.Manifest) -> None:
        """Store `manifest` (a new version, or a version's blocks re-described after a repair)."""
        atomic_write(self._dir(manifest.document) / f"{manifest.version}.manifest", manifest.SerializeToString())
        self._index(manifest)

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

    def delete(self, document: str, version: int) -> list[bytes]:
        """Remove a version's manifest; returns the stored block keys no manifest uses any more."""
        manifest = self.get(document, version)
        (self._dir(document) / f"{version}.manifest").unlink(missing_ok=True)
        orphans = []
        for key in dict.fromkeys(stored_keys(manifest)):
            users = self._users.get(key, set())
            users.discard((document, version))
            if not users:
                self._users.pop(key, None)
                orphans.append(key)
        return orphans


class EventLog:
    """The invalidation feed: an append-only file of `u32 length | InvalidationEvent` records, fsynced
    per append; a record cut short by a crash is ignored (and overwritten by the next append)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "invalidations.log"
        self.events: list[pb.InvalidationEvent] = []
        data = self.path.read_bytes() if self.path.exists() else b""
        pos = 0
        while pos + 4 <= len(data):
            n = int.from_bytes(data[pos : pos + 4], "little")
            if pos + 4 + n > len(data):
                break
            self.events.append(pb.InvalidationEvent.FromString(data[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        self._valid_bytes = pos

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def append(self, document: str, version: int, keys: list[bytes]) -> pb.InvalidationEvent:
        event = pb.InvalidationEvent(seq=self.last_seq + 1, document=document, version=version, keys=keys)
        body = event.SerializeToString()
        with self.path.open("r+b" if self.path.exists() else "wb") as f:
            f.seek(self._valid_bytes)
            f.write(len(body).to_bytes(4, "little") + body)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        self._valid_bytes += 4 + len(body)
        self.events.append(event)
        return event
