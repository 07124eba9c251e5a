"""The edge: serves the KVCache read side from a byte-bounded memory LRU and pulls each missing
block from the origin once, however many agents ask for it at the same moment. Edges never run a
model; they verify every frame they pull against its digest before caching it."""

from kvcdn.edge.config import EdgeConfig
from kvcdn.edge.edge import Edge
from kvcdn.edge.server import run_edge, start_edge

__all__ = ["Edge", "EdgeConfig", "run_edge", "start_edge"]
