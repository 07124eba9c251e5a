"""Bytes at rest and in memory: content-addressed block files (`blockstore`), crash-safe writes
(`files`), the byte-bounded LRU (`lru`) and the single-flight primitive that lets concurrent callers
share one piece of work (`singleflight`)."""
