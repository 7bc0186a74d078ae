"""What keeps a long run safe: preemption, non-finite steps, the workdir.

A preemption notice (SIGTERM, to any one process) becomes a stop at a step
that every process agrees on (a checkpoint is saved and the run exits 0);
non-finite steps stop the run naming the step, or are skipped; a workdir
that cannot be written fails before any work, and one that another live run
holds (`WorkdirLock`) fails with the holder named; a resumed run whose
config differs from the checkpoint's in what the state depends on is
refused with the differing keys (`config_changes`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from etils import epath
import jax
# The key-value store of `jax.distributed` (PeerWatch) has no public API:
# this is where `jax.distributed.initialize` keeps its client.
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
import numpy as np

from gendd_jax import paths
from gendd_jax import sharding
from gendd_jax.errors import ConfigError
from gendd_jax.errors import NonFiniteError
from gendd_jax.errors import WorkdirBusyError
from gendd_jax.errors import first_line


class PreemptionWatch:
  """Turns a preemption notice (SIGTERM) into a stop at a step boundary that
  every process agrees on.

  * One process: a Python SIGTERM handler sets a flag; the previous handler
    is put back on exit.
  * Several processes: `jax.distributed.initialize` installs JAX's own
    preemption notifier, which catches SIGTERM on whichever process gets it
    and propagates it; `multihost_utils.reached_preemption_sync_point` then
    turns true on every process at the same step. No Python handler is
    installed (it would replace JAX's). `should_stop` must be called at
    every step, on every process.
  * Several processes without JAX's preemption service (it was disabled): a
    Python handler sets a local flag and the processes agree on it with an
    all-gather every `agree_every` steps.
  """

  def __init__(self, agree_every: int = 10):
    self.received_at = None
    self.agree_every = max(1, agree_every)
    self._previous = None
    self._installed = False
    self._sync_point = jax.process_count() > 1

  def __enter__(self):
    if not self._sync_point:
      self._install()
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      self._installed = False

  def _install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._installed = True

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.received_at = self.received_at or time.time()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same on every process)."""
    if self._sync_point:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # The preemption service is disabled.
        self._sync_point = False
        self._install()
    if jax.process_count() == 1:
      return self.received_at is not None
    if step % self.agree_every:
      return False
    return sharding.any_process(self.received_at is not None)


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
    paths.makedirs(workdir)
    # One probe per process: hosts may share the directory.
    probe = epath.Path(workdir) / f'.write_test.{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable: '
                      f'{e.strerror or e}') from e


# Config keys that may change between a run and its resumption: logging,
# checkpoint and evaluation cadence, sampling (evaluation only), where the
# data are read from and how fast, and the pipeline's stage list (each stage
# compares its own settings). A key ending in '.' covers its subtree.
# `data.in_memory_limit_mb` picks between two paths that yield the same
# example stream with the same iterator state; a state that cannot carry
# over (streamed with worker processes) is refused when it is restored.
SAFE_TO_CHANGE = (
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'eval_every_steps', 'eval_subset_batches', 'on_nonfinite',
    'allow_config_changes', 'profile_steps', 'tensorboard_dir',
    'fast_compile', 'sampler.',
    'pipeline.', 'data.data_dir', 'data.eval_batch_size', 'data.num_threads',
    'data.prefetch', 'data.worker_count', 'data.shot_groups',
    'data.in_memory_limit_mb', 'precompute.')


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]
                   ) -> list[str]:
  """`'key: old -> new'` for every setting of `current` (a config as a dict)
  that differs from `saved` and that the training state depends on.

  Keys in `SAFE_TO_CHANGE` are ignored, and so are the optimiser settings
  of stages other than `current['stage']`.
  """
  old, new = _flatten(saved), _flatten(current)
  own = f"stages.{current.get('stage')}."
  out = []
  for key in sorted(set(old) | set(new)):
    if any(key == s or (s.endswith('.') and key.startswith(s))
           for s in SAFE_TO_CHANGE):
      continue
    if key.startswith('stages.') and not key.startswith(own):
      continue
    a, b = old.get(key, '<unset>'), new.get(key, '<unset>')
    if a != b:
      out.append(f'{key}: {a!r} -> {b!r}')
  return out


class WorkdirLock:
  """One run at a time per workdir.

  Process 0 writes `<workdir>/gendd.lock` (JSON: host, pid, start time,
  heartbeat) and refreshes the heartbeat from a daemon thread every
  `refresh_seconds`; the lock is removed when the run ends, however it
  ends short of a kill. A second run that finds a live lock raises
  `WorkdirBusyError` naming the holder, on every process. A lock is stale,
  and taken over with a warning, when its holder was a process on this host
  that no longer exists (a kill -9), or when its heartbeat is older than
  `stale_seconds` (a holder on another host that died).

  On local disks the lock is created atomically (O_EXCL); on object stores
  (gs://) two runs started within the same second can both get it: the
  lock guards against the common mistake, not against a race.
  """

  NAME = 'gendd.lock'

  def __init__(self, workdir: str, refresh_seconds: float = 60.0,
               stale_seconds: float = 600.0, log=print):
    self.path = epath.Path(workdir) / self.NAME
    self.refresh_seconds = refresh_seconds
    self.stale_seconds = stale_seconds
    self.log = log
    self._stop = threading.Event()
    self._thread = None
    self._record = None

  def __enter__(self):
    check_workdir(str(self.path.parent))
    busy = ''
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirBusyError as e:
        busy = str(e)
    if jax.process_count() > 1:  # Every process learns the outcome.
      raw = np.zeros(1024, np.uint8)
      text = busy.encode()[:1024]
      raw[:len(text)] = np.frombuffer(text, np.uint8)
      raw = sharding.from_process0(raw)
      busy = bytes(raw[raw > 0]).decode(errors='replace')
    if busy:
      raise WorkdirBusyError(busy)
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout=5)
      try:
        if json.loads(self.path.read_text()).get('token') == \
            self._record['token']:
          self.path.unlink()
      except (OSError, ValueError):
        pass  # Already gone or replaced: nothing of ours to remove.

  def _acquire(self) -> None:
    now = time.time()
    self._record = dict(host=socket.gethostname(), pid=os.getpid(),
                        started=now, heartbeat=now,
                        token=f'{socket.gethostname()}:{os.getpid()}:{now}')
    for _ in range(3):
      if self._create():
        break
      holder = self._read()
      reason = self._stale(holder)
      if reason is None:
        raise WorkdirBusyError(
            f'{self.path.parent} is in use by another run (host '
            f'{holder.get("host")}, pid {holder.get("pid")}, started '
            f'{_when(holder.get("started"))}, last heartbeat '
            f'{_when(holder.get("heartbeat"))}); wait for it to finish, '
            f'or remove {self.path} if that run is gone')
      self.log(f'warning: taking over the stale lock {self.path} ({reason})')
      try:
        self.path.unlink()
      except OSError:
        pass
    else:
      raise WorkdirBusyError(f'could not take the lock {self.path}')
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _create(self) -> bool:
    return paths.create_exclusive(str(self.path), json.dumps(self._record))

  def _read(self) -> dict[str, Any]:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}  # Unreadable or half written: treated as stale below.

  def _stale(self, holder: dict[str, Any]) -> str | None:
    if not holder:
      return 'unreadable'
    if holder.get('host') == socket.gethostname():
      try:
        os.kill(int(holder['pid']), 0)
      except ProcessLookupError:
        return f'its process {holder["pid"]} on this host is gone'
      except (PermissionError, ValueError, KeyError):
        pass
    age = time.time() - float(holder.get('heartbeat', 0))
    if age > self.stale_seconds:
      return f'no heartbeat for {age:.0f}s'
    return None

  def _beat(self) -> None:
    while not self._stop.wait(self.refresh_seconds):
      self._record['heartbeat'] = time.time()
      try:
        paths.write_text(str(self.path), json.dumps(self._record))
      except OSError:
        pass  # A missed beat; the next one retries.


def _when(t) -> str:
  try:
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(t)))
  except (TypeError, ValueError):
    return '?'


class PeerWatch:
  """Names a lost peer on a multi-process run instead of hanging in a
  collective.

  Every `interval` seconds a daemon thread bumps this process's counter in
  JAX's distributed key-value store and reads every other process's. A peer
  whose counter has not moved for `timeout` seconds (killed, frozen, its
  host gone), or a coordinator (process 0) that no longer answers, ends this
  process with one `error:` line naming it and exit status 7. Counters, not
  clocks, are compared, so hosts' clocks need not agree.
  """

  def __init__(self, timeout: float = 60.0, interval: float = 2.0):
    self.timeout, self.interval = timeout, interval
    self._stop = threading.Event()

  def start(self) -> 'PeerWatch':
    if jax.process_count() > 1:
      threading.Thread(target=self._watch, daemon=True).start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def _watch(self) -> None:
    client = jax_distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    seen = {i: (None, time.monotonic()) for i in range(n) if i != me}
    beat, unreachable_since = 0, None
    while not self._stop.wait(self.interval):
      beat += 1
      now = time.monotonic()
      try:
        client.key_value_set(f'gendd/alive/{me}', str(beat),
                             allow_overwrite=True)
        unreachable_since = None
      except Exception as e:  # pylint: disable=broad-except
        unreachable_since = unreachable_since or now
        if now - unreachable_since > self.timeout:
          self._lost(f'lost the coordinator (process 0): its key-value store '
                     f'has not answered for {now - unreachable_since:.0f}s '
                     f'({first_line(e, 200)})')
        continue
      for i, (value, since) in seen.items():
        try:
          got = client.key_value_try_get(f'gendd/alive/{i}')
        except Exception:  # pylint: disable=broad-except
          got = None  # Not written yet.
        if got != value:
          seen[i] = (got, now)
        elif now - since > self.timeout:
          self._lost(f'lost process {i} of {n}: it stopped responding (no '
                     f'heartbeat for {now - since:.0f}s; killed, frozen or '
                     'its host is gone)')

  def _lost(self, message: str) -> None:
    print(f'error: {message}; process {jax.process_index()} exits. Run the '
          'same command on every host to resume from the last checkpoint',
          file=sys.stderr, flush=True)
    os._exit(PEER_LOST_STATUS)  # The main thread may be stuck in a collective.


PEER_LOST_STATUS = 7
