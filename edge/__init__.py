"""The edge: serves the KVCache read side from its tiers (a byte-bounded memory LRU over an optional
disk LRU) and loads each missing block from its owner edges or the origin once, however many agents
ask for it at the same moment. Edges never run a model (this package imports no torch); they verify
every frame they load against its digest before anyone sees it."""

from kvcdn.edge.config import EdgeConfig
from kvcdn.edge.edge import Edge
from kvcdn.edge.server import build_edge, run_edge, serve_edge, start_edge

__all__ = ["Edge", "EdgeConfig", "build_edge", "run_edge", "serve_edge", "start_edge"]
