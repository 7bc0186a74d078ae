"""Experiments, outside the package; run from the repository root as
`python -m experiments.twin_sampler`. Their records live in docs/results/."""
