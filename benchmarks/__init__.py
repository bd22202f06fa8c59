"""Benchmarks of fmaml (see benchmarks/README.md); run as ``python -m benchmarks.<name>``."""
