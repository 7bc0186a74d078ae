"""What keeps a long run safe: preemption, non-finite steps, the workdir.

SIGTERM becomes a flag the loop polls at step boundaries (a checkpoint is
saved and the run exits 0); non-finite steps stop the run naming the step, or
are skipped; a workdir that cannot be written fails before any work.
"""

from __future__ import annotations

import signal
import threading
import time

from etils import epath
import jax
from jax.experimental import multihost_utils

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax.errors import ConfigError
from gendd_jax.errors import NonFiniteError


class PreemptionWatch:
  """Turns SIGTERM into a flag the loop polls at step boundaries.

  On a multi-process run every process must stop at the same step: JAX's
  preemption sync point (which also hooks SIGTERM) decides there.
  """

  def __init__(self):
    self.received_at = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.received_at = self.received_at or time.time()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except (RuntimeError, ValueError):
        pass  # No preemption service (e.g. a local multi-process test).
    return self.received_at is not None


class NonFiniteGuard:
  """Collects the per-step non-finite flags and looks at them in batches
  (one host sync per look): 'stop' raises `NonFiniteError` naming the first
  bad step, 'skip' records the steps (their updates were not applied)."""

  def __init__(self, mode: str, workdir: str, ckpt):
    self.mode, self.workdir, self.ckpt = mode, workdir, ckpt
    self.pending: list = []
    self.skipped: list[int] = []

  def add(self, step: int, flag) -> None:
    self.pending.append((step, flag))

  def check(self) -> None:
    if not self.pending:
      return
    flags = jax.device_get([f for _, f in self.pending])
    bad = [s for (s, _), f in zip(self.pending, flags) if int(f)]
    self.pending.clear()
    if not bad:
      return
    if self.mode == 'skip':
      self.skipped.extend(bad)
      print(f'warning: skipped {len(bad)} step(s) with a non-finite loss or '
            f'gradient (steps {", ".join(map(str, bad[:10]))}'
            f'{"..." if len(bad) > 10 else ""}); {len(self.skipped)} so far',
            flush=True)
      return
    last = self.ckpt.latest_step()
    raise NonFiniteError(
        f'non-finite loss or gradient at step {bad[0]} of {self.workdir} (its '
        f'update was not applied); last good checkpoint: '
        f'{last if last is not None else "none"}.'
        " Resume from it after fixing the cause, or set "
        "--config.on_nonfinite=skip to skip such steps")


def check_workdir(workdir: str) -> None:
  """Fails with one clear message if `workdir` cannot be written."""
  try:
    ckpt_lib.makedirs(workdir)
    # One probe per process: hosts may share the directory.
    probe = epath.Path(workdir) / f'.write_test.{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable: '
                      f'{e.strerror or e}') from e
