"""Benchmarks that print ratios measured in one run (the machines are shared and noisy)."""
