"""Benchmarks and load tests: what kvcdn costs and how fast it is, measured side by side in one run
and printed as tables (never asserted as timings: the machines are shared and noisy)."""
