"""Shared checks: a torch module and its converted NNX twin agree.

Models are built abstractly (`nnx.eval_shape`) and zero-filled before the
torch weights are loaded, so no random initialiser is compiled, and each
forward pass is one jitted, unoptimised computation: on CPU, eager
initialisation and eager forward passes compile every op separately, which
costs far more than the single run they serve.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from gendd_jax.models import torch_import
from gendd_jax import models

# Each forward runs once: unoptimised code compiles faster than it loses.
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def randomise_batch_stats(module: torch.nn.Module, seed: int = 0) -> None:
  """Non-trivial BatchNorm statistics and affine terms, so eval-mode
  normalisation is really exercised."""
  g = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      with torch.no_grad():
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if m.affine:
          m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
          m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _builder(arch: str, num_classes: int, input_shape: tuple, seed: int = 0,
             **settings) -> Callable[[], nnx.Module]:
  return lambda: models.create_backbone(
      arch, num_classes=num_classes, input_shape=tuple(input_shape),
      rngs=nnx.Rngs(seed), **settings)


@functools.cache
def abstract(arch: str, num_classes: int, input_shape: tuple,
             **settings) -> nnx.Module:
  """The registered model `arch` built abstractly: shapes, no values.

  Cached and shared between callers: do not modify it.
  """
  return nnx.eval_shape(_builder(arch, num_classes, input_shape,
                                 **settings))


def empty(arch: str, num_classes: int, input_shape: tuple,
          **settings) -> nnx.Module:
  """The registered model `arch`, zero-filled, its initialisers not run."""
  return torch_import.empty_model(_builder(arch, num_classes, input_shape,
                                      **settings))


def initialised(arch: str, num_classes: int, input_shape: tuple,
                seed: int = 0, **settings) -> nnx.Module:
  """The registered model `arch` with its own random initial weights.

  The initialisers run as one jitted, unoptimised computation: eagerly, each
  would compile on its own, which is slower on CPU.
  """
  build = _builder(arch, num_classes, input_shape, seed, **settings)
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.state(build())).lower().compile(
      _COMPILER_OPTIONS)()
  return nnx.merge(graphdef, state)


def converted(arch: str, source: torch.nn.Module | Mapping[str, Any],
              num_classes: int, input_shape: tuple,
              **settings) -> nnx.Module:
  """The registered model `arch` holding `source`'s weights.

  Args:
    arch: registry name.
    source: a torch module, or a checkpoint object as saved (a state dict,
      possibly wrapped as the reference checkpoints are).
    num_classes: classifier width.
    input_shape: `(H, W, C)`.
    **settings: model settings, passed to the builder.
  """
  if isinstance(source, torch.nn.Module):
    source = source.state_dict()
  model = empty(arch, num_classes, input_shape, **settings)
  torch_import.load_state_dict(model, torch_import.unwrap_state_dict(source))
  return model


def forward(model: nnx.Module, x: np.ndarray, train: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
  """`model(x, train=train)` as one jitted call: `(feature, logits)`.

  As with the eager call, a train-mode pass updates the model's batch
  statistics in place.
  """
  graphdef, state = nnx.split(model)

  def run(state, x):
    m = nnx.merge(graphdef, state)
    feat, logits = m(x, train=train)
    return feat, logits, nnx.state(m, nnx.BatchStat)

  x = jnp.asarray(x)
  compiled = jax.jit(run).lower(state, x).compile(_COMPILER_OPTIONS)
  feat, logits, stats = compiled(state, x)
  nnx.update(model, stats)
  return np.asarray(feat), np.asarray(logits)


def torch_forward(torch_model: torch.nn.Module, x_nhwc: np.ndarray,
                  method: str = 'forward') -> np.ndarray:
  """`torch_model.<method>` on NHWC images; a tuple output gives its last
  entry (the logits)."""
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = getattr(torch_model, method)(x)
  if isinstance(out, (tuple, list)):
    out = out[-1]
  return out.numpy()


def _gap(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
  return float(np.abs(got - want).max()), float(np.abs(want).max())


def logit_gap(arch: str, torch_model: torch.nn.Module, num_classes: int,
              image_nhwc: np.ndarray, seed: int = 0, features: bool = False,
              **settings) -> tuple[float, ...]:
  """Converts `torch_model` to `arch` and compares them in eval mode.

  BatchNorm statistics of `torch_model` are first randomised with `seed`.

  Args:
    arch: registry name.
    torch_model: the torch twin; its forward returns logits (or a tuple
      ending in them).
    num_classes: classifier width.
    image_nhwc: float32 images `[B, H, W, C]`.
    seed: for `randomise_batch_stats`.
    features: also compare the features with `torch_model.features`.
    **settings: model settings, passed to the builder.

  Returns:
    `(max |jax - torch| logits, max |torch logits|)`, followed with
    `features` by the same two numbers for the features.
  """
  randomise_batch_stats(torch_model, seed)
  torch_model.eval()
  model = converted(arch, torch_model, num_classes, image_nhwc.shape[1:],
                    **settings)
  feat, logits = forward(model, image_nhwc)
  assert feat.shape == (image_nhwc.shape[0], model.feature_dim), feat.shape
  out = _gap(logits, torch_forward(torch_model, image_nhwc))
  if features:
    out += _gap(feat, torch_forward(torch_model, image_nhwc, 'features'))
  return out
