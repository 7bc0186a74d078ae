"""Mixed precision: the compute dtype of a module, parameters kept float32.

Every Flax layer that has a `dtype` (Linear, Conv, Embed, BatchNorm,
LayerNorm) computes in that dtype while its parameters stay in their
`param_dtype` (float32). Setting the attribute on every layer of a built
module switches it to, e.g., bfloat16 compute without touching the parameter
tree, so checkpoints and conversions are unaffected. Normalisation statistics
are always reduced in float32 by Flax; loss math is done in float32 by the
callers (`to_float32`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gendd_jax.errors import ConfigError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


def compute_dtype(name: str) -> Any:
  """The dtype called `name`; a `ValueError` naming the choices otherwise."""
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f'unknown compute dtype {name!r}; expected one of '
                     f'{", ".join(DTYPES)}') from None


def set_compute_dtype(module: nnx.Module, name: str) -> nnx.Module:
  """Sets the compute dtype of every layer of `module` (in place).

  'float32' leaves the module as built (layers promote to their inputs'
  dtype), so float32 runs are bit-identical to modules never touched here.
  """
  dtype = compute_dtype(name)
  if name == 'float32':
    return module
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Module) and hasattr(node, 'dtype'):
      node.dtype = dtype
  return module


def to_float32(tree: Any) -> Any:
  """Casts floating leaves of `tree` to float32 (loss math in full
  precision)."""
  def cast(x):
    if x is None or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return x
    return jnp.asarray(x, jnp.float32)
  return jax.tree.map(cast, tree)


def compute_dtypes(config) -> dict[str, str]:
  """`config.precision`'s compute dtype per role (float32 where unset),
  validated."""
  p = config.get('precision') or {}  # No block: float32 everywhere.
  out = {role: p.get(role, 'float32') for role in ('student', 'teacher',
                                                    'head')}
  for role, name in out.items():
    try:
      compute_dtype(name)
    except ValueError as e:
      raise ConfigError(f'precision.{role}: {e}') from None
  return out
