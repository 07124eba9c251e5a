"""Crash-safe file writes shared by every on-disk store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "remove_temporaries"]

_TMP_PREFIX = ".tmp-"


def atomic_write(path: Path, *chunks: bytes | memoryview) -> None:
    """Write `chunks` to `path` so that a crash leaves the old file or the whole new one: a temporary
    file in the same folder, flushed and fsynced, renamed into place, then the folder fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
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


def remove_temporaries(root: Path) -> int:
    """Delete what interrupted writes left below `root`; returns how many files."""
    count = 0
    for tmp in root.rglob(f"{_TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count
