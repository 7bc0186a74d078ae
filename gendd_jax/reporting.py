"""What a run tells its user: the start-up summary, progress lines, and
the metric writers (TensorBoard event files on process 0)."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from gendd_jax import models
from gendd_jax import optim
from gendd_jax import precision
from gendd_jax import sharding


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _mb(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB' if n < 2**30 else f'{n / 2**30:,.2f} GiB'


def hms(seconds: float) -> str:
  seconds = int(round(seconds)) if math.isfinite(seconds) else 0
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def startup_summary(config, stage: str, mesh, module, teacher_vars, info,
                    steps_per_epoch: int, ospec: optim.OptimSpec) -> str:
  """What the run is about to do: devices, batch split, parameters and a
  per-device memory estimate of the persistent state (parameters, optimizer
  state, frozen teacher, one input batch; activations not included)."""
  n = mesh.devices.size
  accum = config.grad_accum_steps
  gb = config.data.batch_size
  params = nnx.state(module, nnx.Param)
  counts = {}
  for name in ('backbone', 'head', 'cls_projector', 'proj'):
    sub = getattr(module, name, None)
    if isinstance(sub, nnx.Module):
      counts[name] = models.param_count(sub)
  total = models.param_count(module)
  opt_bytes = _nbytes(jax.eval_shape(optim.create_optimizer(ospec).init,
                                     params))
  p_bytes = _nbytes(params) + _nbytes(nnx.state(module, nnx.BatchStat))
  t_bytes = _nbytes(teacher_vars) if teacher_vars else 0
  in_bytes = (gb // n // accum) * int(np.prod(info['input_shape'])) * 4
  dtypes = precision.compute_dtypes(config)
  parts = ', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items())
  lines = [
      f'[{stage}] mesh {sharding.describe(mesh)}',
      f'[{stage}] global batch {gb} = {n} device(s) x {gb // n // accum} '
      f'per device x {accum} accumulation step(s); {steps_per_epoch} '
      f'steps/epoch x {config.stages[stage].epochs:g} epochs = '
      f'{ospec.total_steps} steps',
      f'[{stage}] trainable parameters {total / 1e6:.2f}M'
      + (f' ({parts})' if parts else '')
      + (f'; frozen teacher {_count(teacher_vars["params"]) / 1e6:.2f}M'
         if teacher_vars else ''),
      f'[{stage}] compute dtypes student {dtypes["student"]}, head '
      f'{dtypes["head"]}, teacher {dtypes["teacher"]}; parameters and '
      'optimizer state float32',
      f'[{stage}] memory per device (persistent state): parameters '
      f'{_mb(p_bytes)} + optimizer {_mb(opt_bytes)} + gradients '
      f'{_mb(p_bytes)} + teacher {_mb(t_bytes)} + input micro-batch '
      f'{_mb(in_bytes)} = {_mb(2 * p_bytes + opt_bytes + t_bytes + in_bytes)}'
      ' (activations not included)',
  ]
  return '\n'.join(lines)


def create_writer(workdir: str):
  """clu writers: TensorBoard event files (process 0) plus absl logging."""
  # clu's writers import TensorFlow (seconds); only a training run pays it.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def accuracies(acc: dict[str, float]) -> str:
  return ', '.join(f'{k} {v:.2f}%' for k, v in acc.items())
