"""The origin's versioned manifest store on local disk (blocks live in a kvcdn.blockstore.BlockStore).

Every manifest is written atomically (kvcdn.fsutil); leftover temporary files are removed on open.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from kvcdn.errors import InvalidArgument, NotFound
from kvcdn.fsutil import atomic_write, remove_temporaries
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["ManifestStore", "check_document_name"]

_NAME = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")


def check_document_name(name: str) -> None:
    if not _NAME.match(name) or ".." in name.split("/"):
        raise InvalidArgument(
            f"document name {name!r} is invalid: use 1-200 letters, digits and '._-/', no '..' segment"
        )


class ManifestStore:
    """Manifests by document name and version."""

    def __init__(self, root: Path) -> None:
        self.root = root / "manifests"
        self.root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.root)

    def _dir(self, document: str) -> Path:
        return self.root / hashlib.sha256(document.encode()).hexdigest()

    def versions(self, document: str) -> list[int]:
        d = self._dir(document)
        if not d.exists():
            return []
        return sorted(int(p.stem) for p in d.glob("*.manifest"))

    def put(self, manifest: pb.Manifest) -> None:
        atomic_write(self._dir(manifest.document) / f"{manifest.version}.manifest", manifest.SerializeToString())

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
