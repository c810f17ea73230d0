"""Benchmarks reachable from the CLI (`ra bench`)."""
