"""Benchmarks run by `qlm bench ...` (see docs/benchmarks.md)."""
