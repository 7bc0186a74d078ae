"""PyTorch state dicts -> NNX parameter trees (numpy in, numpy out).

Torch `Linear.weight` is `[out, in]` (y = x W^T + b); an NNX `Linear.kernel`
is `[in, out]`, so weights are transposed. Paths follow the torch names with
`Sequential` indices folded into the attribute name (`mlp.0` -> `mlp_0`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx


class ConversionError(ValueError):
  """A state dict does not fit the target model."""


def _denoiser_path(key: str) -> tuple[tuple[Any, ...], str]:
  """Torch key of the diffusion head -> (NNX path, leaf kind)."""
  key = re.sub(r'^(net\.|diffloss\.net\.)', '', key)
  key = key.replace('mlp.0.', 'mlp_0.').replace('mlp.2.', 'mlp_2.')
  key = key.replace('adaLN_modulation.1.', 'adaLN_modulation.')
  parts = key.split('.')
  leaf = parts[-1]
  path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
  return path, leaf


def load_torch_denoiser(model: nnx.Module, state_dict: Mapping[str, Any]
                        ) -> None:
  """Copies a reference `SimpleMLPAdaLN` state dict into a `DenoiserMLP`.

  Every key and shape is checked before anything is written, so a failed
  load leaves the model untouched.

  Raises:
    ConversionError: naming the first unknown, missing or mis-shaped key.
  """
  target = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(target))
  torch_name = {}
  staged = {}
  for key, value in state_dict.items():
    value = np.asarray(value, dtype=np.float32)
    path, leaf = _denoiser_path(key)
    if path == ('pos_embed',) and leaf == 'weight':
      name, arr = 'embedding', value
    elif leaf == 'weight' and value.ndim == 2:
      name, arr = 'kernel', value.T
    elif leaf == 'weight':
      name, arr = 'scale', value
    elif leaf == 'bias':
      name, arr = 'bias', value
    else:
      raise ConversionError(f'unknown key {key!r}')
    full = path + (name,)
    if full not in flat:
      raise ConversionError(f'unknown key {key!r} (no parameter {full})')
    want = flat[full].shape
    if arr.shape != want:
      raise ConversionError(
          f'shape mismatch for {key!r}: got {arr.shape}, want {want}')
    staged[full] = arr
  for full in flat:
    torch_name[full] = _torch_key(full)
  missing = sorted(torch_name[p] for p in flat if p not in staged)
  if missing:
    raise ConversionError(f'missing keys in state dict: {missing}')
  for full, arr in staged.items():
    flat[full][...] = arr
  nnx.update(model, target)


def _torch_key(path: tuple[Any, ...]) -> str:
  """NNX path of a head parameter -> the reference state-dict key."""
  *mods, leaf = [str(p) for p in path]
  key = '.'.join(mods)
  key = key.replace('mlp_0', 'mlp.0').replace('mlp_2', 'mlp.2')
  key = key.replace('adaLN_modulation', 'adaLN_modulation.1')
  leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(
      leaf, leaf)
  return f'{key}.{leaf}'
