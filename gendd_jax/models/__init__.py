"""Flax NNX models: backbones by name, the diffusion head, stage wrappers.

Every backbone maps `[B, H, W, C]` images (or flat vectors for `mlp`) to
`(feature [B, D], logits [B, num_classes])`, exposes `feature_dim`,
`features(x, train)` and its classifier as the linear layer `fc`, so the
teacher classifier `W_cls` is read the same way for every model
(`classifier_weight`). `TORCH_RENAMES` on a model class maps its NNX
attribute paths to the upstream PyTorch state-dict names (see `convert`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
from flax import nnx

from gendd_jax.models import beit
from gendd_jax.models import cifar
from gendd_jax.models import mlp
from gendd_jax.models import mobilenet
from gendd_jax.models import resnet
from gendd_jax.models.denoiser import DenoiserMLP
from gendd_jax.models.mlp import MLPClassifier
from gendd_jax.models.mlp import classifier_weight
from gendd_jax.models.resnet import ResNet
from gendd_jax.errors import ModelError


def _registry() -> dict[str, Callable[..., nnx.Module]]:
  out = {}
  for module in (mlp, resnet, mobilenet, cifar, beit):
    for name, fn in module.MODELS.items():
      if name in out:
        raise RuntimeError(f'model name {name!r} registered twice')
      out[name] = fn
  return out


REGISTRY = _registry()
BACKBONES = tuple(sorted(REGISTRY))


def create_backbone(name: str, *, num_classes: int, input_shape: tuple,
                    rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Builds the backbone registered as `name` (see `BACKBONES`).

  `kwargs` are the model's own settings (e.g. `hidden` for `mlp`); unknown
  names and settings raise `ModelError`.
  """
  if name not in REGISTRY:
    raise ModelError(f'unknown model {name!r}; available: '
                     f'{", ".join(BACKBONES)}')
  fn = REGISTRY[name]
  params = inspect.signature(fn).parameters
  allowed = [p for p in params
             if p not in ('num_classes', 'input_shape', 'rngs')]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ModelError(f'unexpected settings for {name}: {unknown}; it takes '
                     f'{allowed or "none"}')
  try:
    return fn(num_classes, tuple(input_shape), rngs=rngs, **kwargs)
  except TypeError as e:
    raise ModelError(f'cannot build {name}: {e}') from e
  except ValueError as e:
    raise ModelError(str(e)) from e


def param_count(module: nnx.Module) -> int:
  """Number of trainable parameters (BatchNorm statistics excluded)."""
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


__all__ = ['BACKBONES', 'DenoiserMLP', 'MLPClassifier', 'ModelError',
           'REGISTRY', 'ResNet', 'classifier_weight', 'create_backbone',
           'param_count']
