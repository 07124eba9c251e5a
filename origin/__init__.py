"""The origin: the only place that runs prefill. It loads the model, computes the KV cache of each
published document once, stores its blocks content-addressed on disk, records versioned manifests
and streams blocks as digested ~1 MiB frames to edges (or any KVCache client).

The names below load on first use, so the command line can register `kvcdn origin` without importing
torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvcdn.origin.config import OriginConfig

if TYPE_CHECKING:
    from kvcdn.origin.origin import Origin, PublishResult
    from kvcdn.origin.server import run_origin, start_origin
    from kvcdn.origin.store import ManifestStore

__all__ = ["ManifestStore", "Origin", "OriginConfig", "PublishResult", "run_origin", "start_origin"]

_HOME = {
    "ManifestStore": "kvcdn.origin.store",
    "Origin": "kvcdn.origin.origin",
    "PublishResult": "kvcdn.origin.origin",
    "run_origin": "kvcdn.origin.server",
    "start_origin": "kvcdn.origin.server",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
