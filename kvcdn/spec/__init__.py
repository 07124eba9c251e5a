"""What every party computes the same way: cache identity (model fingerprint, chained block keys),
the KV geometry and payload layout, and the consistent-hash ring that places blocks on edges. Pure
functions of their inputs, no torch and no network, so a client in another process or language
reproduces them from this code and the spec in the proto."""
