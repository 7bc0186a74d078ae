"""Flax NNX models: backbones by name, the diffusion head, stage wrappers."""

from __future__ import annotations

from typing import Any

from flax import nnx

from gendd_jax.models.denoiser import DenoiserMLP
from gendd_jax.models.mlp import MLPClassifier
from gendd_jax.models.mlp import classifier_weight
from gendd_jax.models.resnet import ResNet

BACKBONES = ('mlp', 'resnet')


class ModelError(ValueError):
  """A model cannot be built from the given settings."""


def create_backbone(name: str, *, num_classes: int, input_shape: tuple,
                    rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Builds a classifier backbone returning `(feature, logits)`."""
  if name == 'mlp':
    in_dim = 1
    for d in input_shape:
      in_dim *= int(d)
    hidden = tuple(int(h) for h in kwargs.pop('hidden'))
    if kwargs:
      raise ModelError(f'unexpected settings for mlp: {sorted(kwargs)}')
    return MLPClassifier(in_dim, hidden, num_classes, rngs=rngs)
  if name == 'resnet':
    depth = int(kwargs.pop('depth', 50))
    if kwargs:
      raise ModelError(f'unexpected settings for resnet: {sorted(kwargs)}')
    try:
      return ResNet(depth, num_classes, in_channels=int(input_shape[-1]),
                    rngs=rngs)
    except ValueError as e:
      raise ModelError(str(e)) from e
  raise ModelError(f'unknown model {name!r}; available: {", ".join(BACKBONES)}')


__all__ = ['BACKBONES', 'DenoiserMLP', 'MLPClassifier', 'ModelError',
           'ResNet', 'classifier_weight', 'create_backbone']
