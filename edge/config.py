"""Edge configuration, built from `kvcdn edge` flags (or directly by tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcdn.errors import InvalidArgument

__all__ = ["EdgeConfig"]


@dataclass(frozen=True)
class EdgeConfig:
    origin: str
    """Origin address HOST:PORT."""
    listen: str = "127.0.0.1:7080"
    """HOST:PORT to serve on; port 0 picks a free port."""
    mem_bytes: int = 1 << 30
    """Byte budget of the in-memory block tier."""
    disk_dir: Path | None = None
    """Folder of the disk tier (none without it)."""
    disk_bytes: int = 10 << 30
    """Byte budget of the disk tier."""
    bulk_port: int = 0
    """TCP port of the bulk frame stream on the listen host: 0 picks a free port, -1 turns it off."""
    metrics_port: int = -1
    """Port of the Prometheus `/metrics` endpoint on the listen host: 0 picks a free port, -1 turns it off."""
    origin_timeout_s: float = 10.0
    """Deadline of each unary call to the origin (a stream gets ten times this)."""

    def __post_init__(self) -> None:
        if self.mem_bytes < 0 or self.disk_bytes < 0:
            raise InvalidArgument("mem_bytes and disk_bytes must be >= 0")
        if self.origin_timeout_s <= 0:
            raise InvalidArgument("origin_timeout_s must be positive")
