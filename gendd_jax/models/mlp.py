"""Multi-layer perceptron classifiers (the bundled example's networks)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLPClassifier(nnx.Module):
  """ReLU MLP whose last hidden layer is the feature, then a linear `fc`.

  Returns `(feature [B, hidden[-1]], logits [B, num_classes])`, like the
  convolutional backbones, so every mode treats all models alike.
  """

  def __init__(self, in_dim: int, hidden: Sequence[int], num_classes: int, *,
               dtype=None, rngs: nnx.Rngs):
    dims = [in_dim, *hidden]
    self.layers = nnx.List([
        nnx.Linear(a, b, dtype=dtype, rngs=rngs)
        for a, b in zip(dims[:-1], dims[1:])])
    self.feature_dim = dims[-1]
    self.fc = nnx.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or normalisation statistics.
    h = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      h = jax.nn.relu(layer(h))
    return h

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    f = self.features(x, train)
    return f, self.fc(f)


def classifier_weight(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
  """The classifier as `(W [num_classes, D], b [num_classes])`."""
  return jnp.transpose(model.fc.kernel[...]), model.fc.bias[...]


def _build(num_classes: int, input_shape: tuple, *, hidden,
           rngs: nnx.Rngs) -> MLPClassifier:
  in_dim = 1
  for d in input_shape:
    in_dim *= int(d)
  return MLPClassifier(in_dim, tuple(int(h) for h in hidden), num_classes,
                       rngs=rngs)


MODELS = {'mlp': _build}
