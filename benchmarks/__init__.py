"""Benchmarks of mla_jax, run from the repository root as `python -m benchmarks.<name>`."""
