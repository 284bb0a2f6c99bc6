"""Benchmarks: side-by-side measurements that print ratios (see bench/README.md)."""
