"""Command-line tools: evaluate, export, precompute, convert, build_dataset, sweep_sampling, zoo."""
