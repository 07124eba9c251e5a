"""kvcdn, a prefill CDN for AI agents: the core every component shares.

The origin (`kvcdn.origin`) computes a document's KV cache once; edges (`kvcdn.edge`) keep and relay
it; agents (`kvcdn.client`) stream it and continue generation token-exactly; `kvcdn.loadtest` measures
when shipping KV beats recomputing it. This package holds what they share: cache identity
(`identity`), the KV layout (`layout`), wire framing (`frames`, `rpc`), model loading (`models`), the
transformers adapter (`adapter`), prompt framing (`prompt`) and the error hierarchy (`errors`).
"""

__version__ = "0.1.0"
