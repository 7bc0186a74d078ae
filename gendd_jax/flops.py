"""Work of a traced program: FLOPs of its matrix products and convolutions.

Used by the benchmark (achieved FLOP/s) and the model zoo (GMACs per image).
"""

from __future__ import annotations

import math
from typing import Any


def _conv_macs(eqn) -> int:
  """Multiply-adds of a `conv_general_dilated`, zero taps of an input
  dilation (transposed convolutions in a backward pass) not counted."""
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
  per_output = math.prod(rhs) // rhs[spec[0]]
  dilation = math.prod(eqn.params.get('lhs_dilation') or (1,))
  return math.prod(eqn.outvars[0].aval.shape) * per_output // dilation


def _sub_jaxprs(eqn) -> list[Any]:
  subs = []
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, 'eqns'):
        subs.append(v)
      elif hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
        subs.append(v.jaxpr)
  return subs


def matmul_flops(jaxpr) -> int:
  """FLOPs (2 per multiply-add) of the dot products and convolutions of
  `jaxpr` (a `Jaxpr` or `ClosedJaxpr`), nested programs included: a `scan`
  body counts `length` times, a `cond` its costliest branch, a `while` body
  once (its trip count is not static)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in contract)
    elif name == 'conv_general_dilated':
      total += 2 * _conv_macs(eqn)
    subs = [matmul_flops(j) for j in _sub_jaxprs(eqn)]
    if not subs:
      continue
    if name == 'cond':
      total += max(subs)
    elif name == 'scan':
      total += eqn.params['length'] * sum(subs)
    else:
      total += sum(subs)
  return total
