"""The origin: the only place that runs prefill. It loads the model, computes the KV cache of each
published document once, stores its blocks content-addressed on disk, records versioned manifests
and streams blocks as digested ~1 MiB frames to edges (or any KVCache client)."""

from kvcdn.origin.config import OriginConfig
from kvcdn.origin.origin import Origin, PublishResult
from kvcdn.origin.server import run_origin, start_origin
from kvcdn.origin.store import ManifestStore

__all__ = [
    "ManifestStore",
    "Origin",
    "OriginConfig",
    "PublishResult",
    "run_origin",
    "start_origin",
]
