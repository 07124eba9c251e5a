"""Operator tools: start an origin and N edges as processes on loopback (`launcher.Cluster`, behind
`kvcdn up`), the end-to-end demo on the embedded model (`demo`), and a table of the edges' state read
from their metrics (`stats`). Built on the agent client; nothing here runs in an origin or an edge."""
