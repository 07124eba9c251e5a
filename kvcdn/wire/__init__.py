"""Moving frames between processes: framing and BLAKE3 digests (`frames`), the bulk TCP stream
(`bulk`), gRPC plumbing and the domain-error boundary (`rpc`), the stub every caller uses
(`stub.CacheReader`), Prometheus metrics and their names (`metrics`), and running a server until a
signal (`serving`). No torch here: an edge is built from this, `spec` and `store` alone."""
