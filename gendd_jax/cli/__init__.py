"""Command-line tools (absl), each run as `python -m gendd_jax.cli.<name>`."""
