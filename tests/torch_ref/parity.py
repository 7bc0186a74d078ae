"""Shared check: a torch module and its converted NNX twin give the same
logits."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

from gendd_jax import convert
from gendd_jax import models


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


def converted(arch: str, torch_model: torch.nn.Module, num_classes: int,
              input_shape: tuple) -> nnx.Module:
  """Builds `arch` and loads `torch_model`'s state dict into it."""
  model = models.create_backbone(arch, num_classes=num_classes,
                                 input_shape=input_shape, rngs=nnx.Rngs(0))
  state = convert.unwrap_state_dict(torch_model.state_dict())
  convert.load_state_dict(model, state)
  return model


def logit_gap(arch: str, torch_model: torch.nn.Module, num_classes: int,
              image_nhwc: np.ndarray, seed: int = 0) -> tuple[float, float]:
  """`(max |jax - torch| logits, max |torch logits|)` in eval mode.

  The torch model's forward must return logits (or a tuple ending in them).
  """
  randomise_batch_stats(torch_model, seed)
  torch_model.eval()
  model = converted(arch, torch_model, num_classes, image_nhwc.shape[1:])
  with torch.no_grad():
    out = torch_model(torch.from_numpy(
        np.ascontiguousarray(image_nhwc.transpose(0, 3, 1, 2))))
  if isinstance(out, (tuple, list)):
    out = out[-1]
  want = out.numpy()
  feat, got = model(image_nhwc, train=False)
  assert feat.shape[0] == image_nhwc.shape[0]
  return float(np.abs(np.asarray(got) - want).max()), float(
      np.abs(want).max())
