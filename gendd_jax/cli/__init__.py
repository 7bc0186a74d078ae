"""Command-line tools: evaluate, export, precompute, convert, build_dataset,
sweep_sampling and zoo (absl, shared flags and errors in `common`)."""
