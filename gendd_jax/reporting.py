"""What a run tells its user: the start-up summary, progress lines (interval
means of the train metrics, a wall-time estimate), the metric writers
(TensorBoard event files on process 0, `events`), and the per-step hooks:
steps/s and uptime into the summaries, and the profiler."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gendd_jax import events
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


def create_writer(workdir: str) -> events.EventWriter:
  """TensorBoard event files in `workdir` (process 0; the others write
  nothing), without TensorFlow."""
  return events.EventWriter(workdir, enabled=jax.process_index() == 0)


class ReportProgress:
  """Every `every` steps, `steps_per_sec` (since the last report) and
  `uptime` (seconds since the hook was made) into the summaries."""

  def __init__(self, writer, every: int, start: int):
    self.writer, self.every = writer, max(1, every)
    self.t0 = self.last_t = time.time()
    self.last_step = start

  def __call__(self, step: int) -> None:
    if step % self.every:
      return
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_t, 1e-9)
    self.writer.write_scalars(step, {'steps_per_sec': rate,
                                     'uptime': now - self.t0})
    self.last_t, self.last_step = now, step


class Profile:
  """A JAX profiler trace of steps `first + 1 .. first + num_steps` into
  `logdir/plugins/profile` (TensorBoard's profile plugin reads it there)."""

  def __init__(self, logdir: str, num_steps: int, first: int = 10):
    self.logdir, self.first, self.last = logdir, first, first + num_steps
    self.active = False

  def __call__(self, step: int) -> None:
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif step >= self.last and self.active:
      jax.profiler.stop_trace()
      self.active = False

  def close(self) -> None:
    """Stops a trace the run ended inside of."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def progress_hooks(config, workdir: str, writer, start: int = 0) -> list:
  """The hooks called with the step after every step (process 0):
  `ReportProgress` every log step and, with `config.profile_steps`, a
  `Profile` of that many steps from step 10 into `workdir` (the
  `logdir`)."""
  hooks = []
  if jax.process_index() == 0:
    hooks.append(ReportProgress(writer, config.log_every_steps, start))
    if config.get('profile_steps', 0):
      hooks.append(Profile(workdir, int(config.profile_steps)))
  return hooks


@contextlib.contextmanager
def closing(hooks: list):
  """Closes the hooks that hold something open (a profiler trace) when the
  loop ends, also on an error or a preemption."""
  try:
    yield hooks
  finally:
    for hook in hooks:
      if hasattr(hook, 'close'):
        hook.close()


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
