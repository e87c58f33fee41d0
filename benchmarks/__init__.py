"""Throughput and peer-comparison instruments (see benchmarks/RESULTS.md)."""
