"""Command-line tools: evaluate, export, precompute, convert, build_dataset,
sweep_sampling and zoo (absl, shared flags and errors in `common`). After
`pip install .` each is also a console script: `gendd-evaluate`,
`gendd-export`, `gendd-precompute`, `gendd-convert`, `gendd-build-dataset`,
`gendd-sweep-sampling` and `gendd-zoo` (training: `gendd-train`)."""
