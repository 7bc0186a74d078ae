"""What a run tells its user: the start-up summary, progress lines (interval
means of the train metrics, a wall-time estimate), the metric writers
(TensorBoard event files on process 0) and clu's progress and profiling
hooks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gendd_jax import models
from gendd_jax import optim
from gendd_jax import paths
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


def logdir(config, workdir: str) -> str:
  """Where TensorBoard event files and profiles go: `config.tensorboard_dir`,
  else the workdir."""
  return paths.expand(config.get('tensorboard_dir', '')) or workdir


def create_writer(workdir: str):
  """clu writers: TensorBoard event files (process 0) plus absl logging."""
  # clu's writers import TensorFlow (seconds); only a training run pays it.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def progress_hooks(config, workdir: str, total: int, writer) -> list:
  """clu's periodic actions, called with the step after every step:
  `ReportProgress` (steps/s, ETA and uptime into the summaries, every log
  step) and, with `config.profile_steps`, a `Profile` of that many steps
  from step 10 (process 0, into `workdir/plugins/profile`; `workdir` is the
  `logdir`)."""
  # clu's periodic actions import TensorFlow; only a training run pays it.
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(
        num_train_steps=total, writer=writer,
        every_steps=max(1, config.log_every_steps), every_secs=None))
    if config.get('profile_steps', 0):
      hooks.append(periodic_actions.Profile(
          logdir=workdir, num_profile_steps=int(config.profile_steps),
          first_profile=10, every_steps=None, every_secs=None))
  return hooks


@jax.jit
def _tree_add(a, b):  # One dispatch per step, not one per metric.
  return jax.tree.map(jnp.add, a, b)


class IntervalMeans:
  """Means of the step metrics since the last `pop` (kept on the device:
  adding costs no host sync); `lr` is the latest value, `nonfinite` the
  count."""

  def __init__(self):
    self._sum, self._last, self._n = None, None, 0

  def add(self, metrics: dict[str, Any]) -> None:
    self._last = metrics
    self._sum = metrics if self._sum is None else _tree_add(self._sum,
                                                            metrics)
    self._n += 1

  def pop(self) -> dict[str, float]:
    total, last = jax.device_get((self._sum, self._last))
    out = {k: float(v) / self._n for k, v in total.items()}
    out['lr'] = float(last['lr'])
    out['nonfinite'] = float(total['nonfinite'])
    self._sum, self._last, self._n = None, None, 0
    return out


class WallTimeEstimate:
  """Prints once how long the rest of the run should take, from the steps
  measured after the first (which includes compilation)."""

  def __init__(self, name: str, start: int, total: int, log, after: int = 10):
    self.name, self.start, self.total, self.log = name, start, total, log
    self.after = after
    self._first = None  # (step, time) of the first log after step start+1.
    self._done = False

  def update(self, step: int, now: float) -> None:
    if self._done:
      return
    if self._first is None:
      self._first = (step, now)
      return
    first_step, first_time = self._first
    if step - first_step < min(self.after, self.total - first_step):
      return
    rate = (step - first_step) / max(now - first_time, 1e-9)
    self.log(f'[{self.name}] wall-time estimate: {rate:.2f} steps/s over '
             f'steps {first_step}-{step}, so about '
             f'{hms((self.total - step) / max(rate, 1e-9))} for the '
             f'remaining {self.total - step} steps')
    self._done = True


def accuracies(acc: dict[str, float]) -> str:
  return ', '.join(f'{k} {v:.2f}%' for k, v in acc.items())
