"""The origin's versioned manifest store on local disk (blocks live in a kvcdn.store.blockstore.BlockStore).

Every manifest is written atomically (kvcdn.store.files) behind a SHA-256 of its bytes; leftover
temporary files are removed on open. An index kept in memory (built from the manifests on open) says
which manifests use each stored block key, so a purge finds the blocks it orphans without reading
every manifest, and a corrupt block finds a document to recompute it from.

Damaged metadata costs only what it describes: a manifest file that fails its digest (or does not
parse, or names another document or version than its path) is moved to the quarantine folder and
that version answers DATA_LOSS until the document is published again; a damaged record of the
invalidation feed is skipped (the feed resynchronizes on the next whole record) and the log is
rewritten whole. Either is logged and counted (`origin_metadata_quarantined_total`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.message import DecodeError

from kvcdn.errors import DigestMismatch, InvalidArgument, NotFound
from kvcdn.spec.identity import encoded_key
from kvcdn.store.files import atomic_write, remove_temporaries
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["EventLog", "ManifestStore", "check_document_name", "stored_keys", "with_ids"]

log = logging.getLogger(__name__)

Version = tuple[str, int]
"""(document, version)."""

_MAGIC = b"KVCDNMF1"
"""A manifest file: this, the SHA-256 of the serialized Manifest, then the Manifest. (Files written
before the digest are the bare Manifest; they are checked against their path and rewritten.)"""


def stored_keys(manifest: pb.Manifest) -> list[bytes]:
    """Every block key a manifest's document is stored under: raw and each offered encoding."""
    return [encoded_key(b.key, c) for b in manifest.blocks for c in ("raw", *manifest.codecs)]


def with_ids(manifest: pb.Manifest, token_ids: bool) -> pb.Manifest:
    """`manifest` as stored, or a copy without its token ids (what answers carry unless asked)."""
    if token_ids or not manifest.token_ids:
        return manifest
    out = pb.Manifest()
    out.CopyFrom(manifest)
    out.ClearField("token_ids")
    return out


_NAME = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def check_document_name(name: str) -> None:
    if not _NAME.fullmatch(name) or ".." in name.split("/"):
        raise InvalidArgument(
            f"document name {name!r} is invalid: use 1-200 letters, digits and '._-/', no '..' segment"
        )


def _folder(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


class _Damaged(Exception):
    """A manifest file that cannot be trusted (says why)."""


def _parse(path: Path) -> tuple[pb.Manifest, bool]:
    """The manifest stored at `path` (`folder/<version>.manifest`) and whether it is in the old,
    digest-less format; _Damaged if its bytes fail their digest, do not parse, or describe another
    document or version than the path says."""
    data = path.read_bytes()
    legacy = not data.startswith(_MAGIC)
    body = data if legacy else data[len(_MAGIC) + 32 :]
    if not legacy and hashlib.sha256(body).digest() != data[len(_MAGIC) : len(_MAGIC) + 32]:
        raise _Damaged("its bytes do not match their SHA-256")
    try:
        manifest = pb.Manifest.FromString(body)
    except DecodeError:
        raise _Damaged("it is not a Manifest") from None
    if _folder(manifest.document) != path.parent.name or str(manifest.version) != path.stem:
        raise _Damaged(f"it describes {manifest.document[:80]!r} v{manifest.version}, not the document of its path")
    return manifest, legacy


class ManifestStore:
    """Manifests by document name and version."""

    def __init__(self, root: Path, quarantine: Path | None = None) -> None:
        self.root = root / "manifests"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine = quarantine if quarantine is not None else root / "quarantine"
        remove_temporaries(self.root)
        self._users: dict[bytes, set[Version]] = {}
        self._priced: set[Version] = set()
        """Versions whose manifests carry a price."""
        self._damaged: dict[str, set[int]] = {}
        """Versions quarantined, by document folder (their numbers are not given to new versions)."""
        self.quarantined = 0
        """Manifest files quarantined by this process."""
        for path in self.quarantine.glob("manifest-*.manifest"):
            folder, _, version = path.name.split(".")[0].removeprefix("manifest-").partition("-v")
            if version.isdigit():
                self._damaged.setdefault(folder, set()).add(int(version))
        for path in self.root.glob("*/*.manifest"):
            try:
                manifest, legacy = _parse(path)
            except _Damaged as exc:
                self._quarantine(path, str(exc))
                continue
            if legacy:
                self.put(manifest)  # rewritten with its digest
            self._index(manifest)

    def _quarantine(self, path: Path, why: str) -> None:
        """Move a damaged manifest file aside; its version answers DATA_LOSS until republished."""
        self.quarantine.mkdir(parents=True, exist_ok=True)
        folder, version = path.parent.name, int(path.stem)
        path.rename(self.quarantine / f"manifest-{folder}-v{version}.{time.time_ns()}.manifest")
        self._damaged.setdefault(folder, set()).add(version)
        self.quarantined += 1
        log.error(
            "manifest %s is damaged (%s): moved to %s; that version answers DATA_LOSS until the document "
            "is published again",
            path,
            why,
            self.quarantine,
        )

    def _index(self, manifest: pb.Manifest) -> None:
        version = (manifest.document, manifest.version)
        for key in stored_keys(manifest):
            self._users.setdefault(key, set()).add(version)
        if manifest.HasField("price"):
            self._priced.add(version)

    def users(self, key: bytes) -> list[Version]:
        """The (document, version) pairs whose manifests use the stored block `key`, oldest first."""
        return sorted(self._users.get(key, ()))

    def priced(self, keys: Sequence[bytes]) -> set[bytes]:
        """Those of `keys` that only priced versions use (BlockInfo.priced)."""
        if not self._priced:
            return set()
        return {k for k in keys if (users := self._users.get(k)) and users <= self._priced}

    def _dir(self, document: str) -> Path:
        return self.root / _folder(document)

    def versions(self, document: str) -> list[int]:
        """The versions of `document` that can be read (damaged ones are not among them)."""
        d = self._dir(document)
        if not d.exists():
            return []
        return sorted(int(p.stem) for p in d.glob("*.manifest"))

    def next_version(self, document: str) -> int:
        """The number a new version of `document` takes: above every version it had, damaged included."""
        damaged: set[int] = self._damaged.get(_folder(document), set())
        return max([0, *self.versions(document), *damaged]) + 1

    def put(self, manifest: pb.Manifest) -> None:
        """Store `manifest` (a new version, or a version's blocks re-described after a repair)."""
        body = manifest.SerializeToString()
        path = self._dir(manifest.document) / f"{manifest.version}.manifest"
        atomic_write(path, _MAGIC, hashlib.sha256(body).digest(), body)
        self._index(manifest)

    def get(self, document: str, version: int = 0) -> pb.Manifest:
        """The manifest of `document` at `version` (0: the latest); DigestMismatch (DATA_LOSS) for a
        version whose manifest is damaged."""
        check_document_name(document)
        versions = self.versions(document)
        damaged = self._damaged.get(_folder(document), set())
        latest = max([0, *versions, *damaged])
        if not latest:
            raise NotFound(f"document {document!r} has not been published")
        if version == 0:
            version = latest
        if version in damaged and version not in versions:
            raise DigestMismatch(
                f"the manifest of document {document!r} v{version} was damaged on the origin's disk and is "
                "quarantined; publish the document again to repair it"
            )
        if version not in versions:
            raise NotFound(f"document {document!r} has no version {version} (latest is {latest})")
        path = self._dir(document) / f"{version}.manifest"
        try:
            return _parse(path)[0]
        except _Damaged as exc:  # damaged since the store opened
            self._quarantine(path, str(exc))
            return self.get(document, version)

    def delete(self, document: str, version: int) -> list[bytes]:
        """Remove a version's manifest; returns the stored block keys no manifest uses any more."""
        manifest = self.get(document, version)
        (self._dir(document) / f"{version}.manifest").unlink(missing_ok=True)
        self._priced.discard((document, version))
        orphans = []
        for key in dict.fromkeys(stored_keys(manifest)):
            users = self._users.get(key, set())
            users.discard((document, version))
            if not users:
                self._users.pop(key, None)
                orphans.append(key)
        return orphans

    def forget_damaged(self, document: str) -> list[int]:
        """Drop the damaged versions of `document` (a purge of all its versions); returns them. Their
        quarantined files stay, renamed so the next start does not count them."""
        folder = _folder(document)
        versions = sorted(self._damaged.pop(folder, ()))
        for path in self.quarantine.glob(f"manifest-{folder}-v*.manifest"):
            path.rename(path.with_suffix(".purged"))
        return versions


_MIN_RECORD = 6
"""Bytes of the smallest record (a length and a seq field)."""


def _records(data: bytes, pos: int, first_seq: int | None) -> tuple[list[pb.InvalidationEvent], int, bool]:
    """The events read from `pos` on (numbered on from `first_seq` when given), where they end, and
    whether they end at a damaged record (one that does not parse, or breaks the numbering) rather
    than at the end of `data` or a record cut short."""
    events: list[pb.InvalidationEvent] = []
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        if pos + 4 + n > len(data):
            return events, pos, False
        try:
            event = pb.InvalidationEvent.FromString(data[pos + 4 : pos + 4 + n])
        except DecodeError:
            return events, pos, True
        expected = events[-1].seq + 1 if events else first_seq
        if event.seq <= 0 or (expected is not None and event.seq != expected):
            return events, pos, True
        events.append(event)
        pos += 4 + n
    return events, pos, False


def _resync(data: bytes, pos: int, after_seq: int) -> tuple[list[pb.InvalidationEvent], int] | None:
    """Past a damaged record at `pos`: the first offset from which whole records, numbered above
    `after_seq` (by no more than the skipped bytes could hold), run to the end of `data`; those
    records and where they end."""
    for start in range(pos + 1, len(data) - 4):
        events, end, damaged = _records(data, start, None)
        if (
            events
            and not damaged
            and end == len(data)
            and after_seq < events[0].seq <= after_seq + (start - pos) // _MIN_RECORD + 1
        ):
            return events, end
    return None


class EventLog:
    """The invalidation feed: an append-only file of `u32 length | InvalidationEvent` records, fsynced
    per append; a record cut short by a crash is ignored (and overwritten by the next append).

    A damaged record (one that does not parse, breaks the numbering, or announces more bytes than
    follow while whole records do follow) is skipped: reading resumes at the next offset from which
    whole records run to the end, the seqs in between become empty events (every seq from 1 stays
    present, so an edge's position stays meaningful), the damaged file is copied to the quarantine
    folder and the log rewritten whole. Records carry no digest of their own: a flipped byte that
    still parses as the right seq goes unnoticed."""

    def __init__(self, root: Path, quarantine: Path | None = None) -> None:
        self.path = root / "invalidations.log"
        data = self.path.read_bytes() if self.path.exists() else b""
        self.events, pos, damaged = _records(data, 0, 1)
        self.damaged = 0
        """Damaged records this process skipped on open (their seqs are empty events now)."""
        found = _resync(data, pos, self.last_seq) if pos < len(data) else None
        if damaged or found is not None:
            after = self.last_seq
            later, pos = found if found is not None else ([], len(data))
            first = later[0].seq if later else after + 2  # a damaged last record keeps its seq
            self.damaged = max(1, first - after - 1)
            self.events += [pb.InvalidationEvent(seq=seq) for seq in range(after + 1, first)] + later
        self._valid_bytes = pos
        if self.damaged:
            self._repair(data, quarantine if quarantine is not None else root / "quarantine")

    def _repair(self, data: bytes, quarantine: Path) -> None:
        quarantine.mkdir(parents=True, exist_ok=True)
        copy = quarantine / f"invalidations.{time.time_ns()}.log"
        atomic_write(copy, data)
        records = [_record(event) for event in self.events]
        atomic_write(self.path, *records)
        self._valid_bytes = sum(len(r) for r in records)
        log.error(
            "invalidations.log had damaged records (the file is copied to %s): %d seqs are empty events "
            "now, so an edge that had not applied them keeps the blocks they named until it evicts them "
            "(purge those documents again to be sure)",
            copy,
            self.damaged,
        )

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def append(self, document: str, version: int, keys: list[bytes], revocation: str = "") -> pb.InvalidationEvent:
        event = pb.InvalidationEvent(
            seq=self.last_seq + 1, document=document, version=version, keys=keys, revocation=revocation
        )
        record = _record(event)
        with self.path.open("r+b" if self.path.exists() else "wb") as f:
            f.seek(self._valid_bytes)
            f.write(record)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        self._valid_bytes += len(record)
        self.events.append(event)
        return event


def _record(event: pb.InvalidationEvent) -> bytes:
    body = event.SerializeToString()
    return len(body).to_bytes(4, "little") + body
