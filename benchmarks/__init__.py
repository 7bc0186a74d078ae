"""Benchmarks, outside the package; run from the repository root as
`python -m benchmarks.bench` and `python -m benchmarks.bench_input`."""
