"""PyTorch state dicts -> NNX models (the teacher import of
`python -m gendd_jax.cli.convert` and the reference denoiser's weights).

`.safetensors` files are read without torch; `.pth`/`.pt`/`.bin` files need
torch (an optional extra). Checkpoints that wrap the state dict (`model`,
`state_dict`, `module`, as the reference CIFAR teachers and unilm BEiT
checkpoints do) are unwrapped, and a DistributedDataParallel `module.` prefix
is dropped.

Conversion is generic: a model's NNX attribute path, after the model class's
`TORCH_RENAMES` regex substitutions, is the torch module name; the leaf maps
by kind. Torch `Linear.weight` is `[out, in]` (y = x W^T + b) where an NNX
`Linear.kernel` is `[in, out]`; a torch conv weight is `[out, in/groups, kh,
kw]` where NNX uses `[kh, kw, in/groups, out]`. BatchNorm `running_mean` /
`running_var` are the NNX batch statistics `mean` / `var`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from gendd_jax.errors import ConversionError


def load_torch_denoiser(model: nnx.Module, state_dict: Mapping[str, Any]
                        ) -> None:
  """Copies a reference `SimpleMLPAdaLN` state dict into a `DenoiserMLP`.

  Keys may carry the reference's `net.` or `diffloss.net.` prefix. Every key
  and shape is checked before anything is written, so a failed load leaves
  the model untouched.

  Raises:
    ConversionError: naming the unknown, missing or mis-shaped keys.
  """
  load_state_dict(model, {re.sub(r'^(diffloss\.)?net\.', '', k): v
                          for k, v in state_dict.items()})


# ---------------------------------------------------------------------------
# Generic conversion.
# ---------------------------------------------------------------------------

# NNX leaf name -> torch parameter/buffer name.
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight',
               'mean': 'running_mean', 'var': 'running_var'}
# Torch buffers that carry no information the NNX models need.
_IGNORED = (r'(^|\.)num_batches_tracked$', r'(^|\.)relative_position_index$')


def torch_key(path: tuple[Any, ...], renames=()) -> str:
  """NNX variable path -> the upstream torch state-dict key."""
  *mods, leaf = [str(p) for p in path]
  prefix = '.'.join(mods)
  for pattern, repl in renames:
    prefix = re.sub(pattern, repl, prefix)
  leaf = _LEAF_NAMES.get(leaf, leaf)
  return f'{prefix}.{leaf}' if prefix else leaf


def _relayout(leaf: str, value: np.ndarray, to_nnx: bool) -> np.ndarray:
  """Torch <-> NNX array layout: conv OIHW <-> HWIO, linear [out, in] <->
  [in, out]; everything else is shared."""
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose((2, 3, 1, 0) if to_nnx else (3, 2, 0, 1))
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _to_nnx(leaf: str, value: np.ndarray) -> np.ndarray:
  return _relayout(leaf, value, to_nnx=True)


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  return _relayout(leaf, value, to_nnx=False)


def model_key_map(model: nnx.Module) -> dict[str, tuple[Any, ...]]:
  """torch key -> NNX path for every parameter and batch statistic."""
  renames = getattr(model, 'TORCH_RENAMES', ())
  state = nnx.state(model, nnx.Param, nnx.BatchStat)
  out = {}
  for sub in state:
    for path, _ in nnx.to_flat_state(sub):
      key = torch_key(path, renames)
      if key in out:
        raise RuntimeError(f'{type(model).__name__}: {path} and {out[key]} '
                           f'both map to torch key {key!r}')
      out[key] = path
  return out


def empty_model(build) -> nnx.Module:
  """`build()`'s model with zero-filled variables, without running its
  initialisers (fast, and cheap for large models about to be overwritten)."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)
  return nnx.merge(graphdef, state)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]
                    ) -> None:
  """Copies a torch state dict (arrays by key) into `model`.

  Every key and shape is checked before anything is written, so a failed
  load leaves the model untouched.

  Raises:
    ConversionError: naming the unknown, missing or mis-shaped keys.
  """
  renames = getattr(model, 'TORCH_RENAMES', ())
  params, stats = nnx.state(model, nnx.Param), nnx.state(model,
                                                         nnx.BatchStat)
  flat = dict(nnx.to_flat_state(params))
  flat.update(nnx.to_flat_state(stats))
  by_key = {torch_key(p, renames): p for p in flat}
  name = type(model).__name__
  unknown = [k for k in state_dict if k not in by_key
             and not any(re.search(p, k) for p in _IGNORED)]
  missing = [k for k in by_key if k not in state_dict]
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f'unexpected keys {_preview(unknown)}')
    if missing:
      parts.append(f'missing keys {_preview(missing)}')
    raise ConversionError(f'state dict does not fit {name}: '
                          + '; '.join(parts))
  staged, bad = {}, []
  for key, path in sorted(by_key.items()):
    value = np.asarray(state_dict[key], dtype=np.float32)
    arr = _to_nnx(str(path[-1]), value)
    want = tuple(flat[path].shape)
    if arr.shape != want:
      torch_shape = _to_torch(str(path[-1]), np.empty(want)).shape
      bad.append(f'{key!r}: checkpoint has {tuple(value.shape)}, {name} '
                 f'needs {tuple(torch_shape)}')
    staged[path] = arr
  if bad:
    more = f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''
    raise ConversionError('shape mismatch for ' + '; '.join(bad[:3]) + more)
  for path, arr in staged.items():
    flat[path][...] = arr
  nnx.update(model, params, stats)


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The torch-layout state dict of `model` (the inverse of loading)."""
  out = {}
  for key, path in model_key_map(model).items():
    var = model
    for p in path:
      var = var[p] if isinstance(p, int) else getattr(var, p)
    out[key] = np.ascontiguousarray(_to_torch(str(path[-1]),
                                              np.asarray(var[...])))
  return out


def _preview(keys: list[str], n: int = 6) -> str:
  shown = ', '.join(repr(k) for k in keys[:n])
  more = f' and {len(keys) - n} more' if len(keys) > n else ''
  return f'[{shown}{more}]'


# ---------------------------------------------------------------------------
# Reading checkpoint files.
# ---------------------------------------------------------------------------

_WRAPPERS = ('model', 'state_dict', 'module', 'model_ema')


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads a torch state dict from `.safetensors` or a torch pickle."""
  if not os.path.exists(path):
    raise ConversionError(f'checkpoint {path} does not exist')
  if path.endswith('.safetensors'):
    # Imported on use: only .safetensors files need it.
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      raw = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'cannot read {path}: {e}') from e
  else:
    try:
      # torch is an optional heavy dependency, needed only for pickles.
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(
          f'{path} is a PyTorch pickle and reading it needs torch '
          '(pip install torch), or convert it to .safetensors first') from e
    try:
      raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'cannot read {path}: '
                            f'{str(e).splitlines()[0]}') from e
  return unwrap_state_dict(raw, path)


def unwrap_state_dict(raw: Any, source: str = 'checkpoint'
                      ) -> dict[str, np.ndarray]:
  """Finds the state dict in a checkpoint object; arrays as numpy."""
  for _ in range(3):
    if isinstance(raw, Mapping) and not _is_state_dict(raw):
      inner = [w for w in _WRAPPERS if isinstance(raw.get(w), Mapping)]
      if not inner:
        break
      raw = raw[inner[0]]
  if not isinstance(raw, Mapping) or not _is_state_dict(raw):
    raise ConversionError(f'{source} holds no state dict (expected a mapping '
                          'of parameter names to arrays, possibly under '
                          f'one of {list(_WRAPPERS)})')
  out = {}
  for key, value in raw.items():
    if not hasattr(value, 'shape'):
      continue
    if hasattr(value, 'detach'):  # A torch tensor.
      value = value.detach().float().numpy()
    key = key[len('module.'):] if key.startswith('module.') else key
    out[key] = np.asarray(value)
  return out


def _is_state_dict(d: Mapping) -> bool:
  return bool(d) and any(hasattr(v, 'shape') for v in d.values())
