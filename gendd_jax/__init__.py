"""gendd_jax: Generative Distribution Distillation in JAX/Flax."""

__version__ = '0.1.0'
