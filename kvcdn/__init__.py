"""kvcdn, a prefill CDN for AI agents: the core every component shares.

The origin (`kvcdn.origin`) computes a document's KV cache once; edges (`kvcdn.edge`) keep and relay
it; agents (`kvcdn.client`) stream it and continue generation token-exactly; operators start and watch
a network with `kvcdn.ops`; `kvcdn.loadtest` measures when shipping KV beats recomputing it. The core
is grouped by concern: `spec` (cache identity, KV geometry, ring placement), `wire` (frames, the bulk
stream, gRPC plumbing, the stub, metrics), `store` (block files, LRU, single-flight), `model` (loading,
the transformers adapter, prompt framing, tensors), `errors` (the exception hierarchy and its gRPC
codes), `flags` (shared flag types) and `cli` (dispatch to the components' commands).
"""

__version__ = "0.1.0"
