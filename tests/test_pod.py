"""Faults on a pod slice, simulated: two processes on localhost with two CPU
devices each run the GenDD stage (frozen teacher, student and diffusion
head) through `python -m gendd_jax.main --distributed`.

One workdir goes through every fault in turn, and the run that finally
completes equals an uninterrupted two-process run bit for bit:

* SIGTERM to one process, then (resumed) to both: every process stops at
  the same step, one checkpoint is saved, and all exit 0. While a run holds
  the workdir, a second run on it is refused (exit 5) naming the holder.
* kill -9 of one process: the survivor exits 7 within two minutes naming
  the lost peer; the lock it leaves is detected as stale later.
* Restore: a changed config is refused with the differing keys (exit 4) and
  a changed process count is refused (exit 6), with nothing renamed; a truly
  corrupt checkpoint is moved aside and the previous one resumed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl.testing import absltest
import numpy as np

import testing

_TMP = None
_DEVICES = 2  # Simulated CPU devices per process.


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_pod_')
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()
  _TMP.cleanup()


def _args(workdir, *extra):
  """A 28-step GenDD stage (global batch 128 over 4 devices), checkpointing
  every 3 steps and logging each."""
  return ['--config=configs/digits.py:quick', f'--workdir={workdir}',
          '--config.stage=gendd',
          f'--config.teacher.checkpoint={testing.teacher_export()[0]}',
          '--config.gendd.width=32', '--config.gendd.depth=1',
          '--config.gendd.diffusion_batch_mul=1',
          '--config.sampler.steps=2',
          '--config.sampler.also_eval_clipped=False',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=3',
          '--config.keep_checkpoints=20', '--config.stages.gendd.epochs=4',
          *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Pod:
  """`n` processes of one distributed run, their output read as it comes."""

  def __init__(self, args, n=2, extra_flags=()):
    port = _free_port()
    self.procs, self.lines = [], []
    self._seen = threading.Condition()
    for i in range(n):
      flags = [] if n == 1 else [
          '--distributed', f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={n}', f'--process_id={i}', *extra_flags]
      proc = subprocess.Popen(
          [sys.executable, '-u', '-m', 'gendd_jax.main', *args, *flags],
          cwd=testing.ROOT, env=testing.subprocess_env(devices=_DEVICES),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      self.procs.append(proc)
      self.lines.append([])
      threading.Thread(target=self._read, args=(i,), daemon=True).start()

  def _read(self, i):
    for line in self.procs[i].stdout:
      with self._seen:
        self.lines[i].append(line)
        self._seen.notify_all()
    with self._seen:
      self.lines[i].append(None)  # End of output.
      self._seen.notify_all()

  def output(self, i) -> str:
    with self._seen:
      return ''.join(ln for ln in self.lines[i] if ln is not None)

  def wait_for(self, text, i=0, timeout=240):
    """Waits until process `i` prints a line containing `text`."""
    deadline = time.time() + timeout
    with self._seen:
      while not any(ln is not None and text in ln for ln in self.lines[i]):
        if None in self.lines[i] or time.time() > deadline:
          raise AssertionError(f'process {i} never printed {text!r}:\n'
                               + self.output(i)[-3000:])
        self._seen.wait(1.0)

  def finish(self, timeout=240) -> list[int]:
    """Waits for every process; returns their exit statuses."""
    deadline = time.time() + timeout
    for p in self.procs:
      try:
        p.wait(max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        self.kill()
        raise
    return [p.returncode for p in self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _committed(workdir) -> list[int]:
  ckpts = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpts):
    return []
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())


class PodTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference = os.path.join(_TMP.name, 'uninterrupted')
    pod = _Pod(_args(cls.reference))
    statuses = pod.finish()
    assert statuses == [0, 0], (statuses, pod.output(0)[-3000:],
                                pod.output(1)[-3000:])
    cls.reference_output = pod.output(0)
    cls.reference_weights = testing.export_weights(cls.reference)

  def assertSameWeights(self, workdir, msg=''):
    got = testing.export_weights(workdir)
    self.assertEqual(set(got), set(self.reference_weights), msg)
    for k, v in self.reference_weights.items():
      np.testing.assert_array_equal(got[k], v, err_msg=f'{msg} {k}')

  def assertResumes(self, workdir, step):
    pod = _Pod(_args(workdir))
    statuses = pod.finish()
    self.assertEqual(statuses, [0, 0], pod.output(0)[-3000:])
    for i in range(2):
      self.assertIn(f'[gendd] resumed from step {step}', pod.output(i))
    self.assertSameWeights(workdir, f'resumed from step {step}')
    return pod.output(0)

  def test_reference_run_is_two_processes_in_step(self):
    out = self.reference_output
    self.assertIn('JAX', out)
    self.assertRegex(out, r'4 device\(s\) \(cpu\), 2 process\(es\)')
    self.assertIn('[gendd] step 28/28', out)
    self.assertFalse(os.path.exists(
        os.path.join(self.reference, 'gendd.lock')))

  def test_faults_in_sequence_then_bit_exact(self):
    # One workdir goes through every fault in turn; the run that finally
    # completes must still equal the uninterrupted one bit for bit.
    workdir = os.path.join(_TMP.name, 'faults')
    # 1. SIGTERM to process 1 only: both stop at the same step, exit 0.
    saved = self.preempt(workdir, targets=(1,), at=4, resumed_from=None)
    # 2. Resumed, frozen mid-run: a second run on the workdir is refused
    #    naming the holder; then SIGTERM to both processes.
    saved = self.preempt(workdir, targets=(0, 1), at=saved + 3,
                         resumed_from=saved, second_run=True)
    # 3. Resumed, kill -9 of process 1 once a newer checkpoint is committed:
    #    the survivor exits 7 within two minutes naming the lost peer.
    self.lose_peer(workdir, resumed_from=saved)
    # 4. Refused resumes, nothing renamed: a changed schedule (exit 4, the
    #    differing keys listed) and another process count (exit 6).
    before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
    newest = max(_committed(workdir))
    pod = _Pod(_args(workdir, '--config.stages.gendd.lr=0.01',
                     '--config.stages.gendd.epochs=6'))
    self.assertEqual(pod.finish(), [4, 4], pod.output(0)[-2000:])
    # The lock the survivor of step 3 left (its process is gone) is stale.
    self.assertRegex(pod.output(0), r'warning: taking over the stale lock '
                     r'.*gendd\.lock \(its process \d+ on this host is gone')
    self.assertRegex(pod.output(0), r'error: .*the config differs from the '
                     rf'one checkpoint {newest} was saved with \(stages\.'
                     r'gendd\.epochs: 4\.0 -> 6\.0; stages\.gendd\.lr: ')
    single = _Pod(_args(workdir), n=1)
    self.assertEqual(single.finish(), [6], single.output(0)[-2000:])
    self.assertRegex(single.output(0), rf'error: checkpoint {newest} .* was '
                     r'written by 2 process\(es\), this run has 1')
    self.assertEqual(
        sorted(os.listdir(os.path.join(workdir, 'checkpoints'))), before)
    # 5. The newest checkpoint truly corrupt (truncated files): moved aside,
    #    the previous one resumed.
    state = os.path.join(workdir, 'checkpoints', str(newest), 'state')
    for root, _, files in os.walk(state):
      for f in files:
        path = os.path.join(root, f)
        with open(path, 'r+b') as fh:
          fh.truncate(os.path.getsize(path) // 3)
    previous = max(s for s in _committed(workdir) if s < newest)
    out = self.assertResumes(workdir, previous)
    self.assertIn(f'{newest}.corrupt', out)
    self.assertTrue(os.path.isdir(
        os.path.join(workdir, 'checkpoints', f'{newest}.corrupt')))

  def preempt(self, workdir, targets, at, resumed_from, second_run=False):
    """Runs (resuming from `resumed_from`) until step `at`, sends SIGTERM to
    the processes `targets`; returns the step both saved at."""
    pod = _Pod(_args(workdir))
    try:
      pod.wait_for(f'[gendd] step {at}/')
      if second_run:
        for p in pod.procs:  # Frozen, still alive: the workdir stays held.
          p.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [sys.executable, '-m', 'gendd_jax.main', *_args(workdir)],
            cwd=testing.ROOT, env=testing.subprocess_env(),
            capture_output=True, text=True, timeout=120)
        for p in pod.procs:
          p.send_signal(signal.SIGCONT)
        self.assertEqual(second.returncode, 5, second.stderr[-2000:])
        self.assertRegex(second.stderr,
                         r'error: .* is in use by another run \(host .*, '
                         rf'pid {pod.procs[0].pid}')
      for i in targets:
        pod.procs[i].send_signal(signal.SIGTERM)
      statuses = pod.finish(timeout=120)
    finally:
      pod.kill()
    outs = [pod.output(i) for i in range(2)]
    what = f'SIGTERM to {targets}'
    self.assertEqual(statuses, [0, 0], f'{what}: {outs[0][-2000:]}')
    saved = []
    for out in outs:
      if resumed_from is not None:
        self.assertIn(f'[gendd] resumed from step {resumed_from}', out)
      m = re.search(r'SIGTERM: saved checkpoint (\d+) of', out)
      self.assertIsNotNone(m, f'{what}: {out[-2000:]}')
      saved.append(int(m.group(1)))
    self.assertEqual(saved[0], saved[1], what)  # The same step everywhere.
    self.assertBetween(saved[0], at, 27, what)
    self.assertEqual(max(_committed(workdir)), saved[0], what)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'export')))
    return saved[0]

  def lose_peer(self, workdir, resumed_from):
    pod = _Pod(_args(workdir), extra_flags=('--heartbeat_timeout=20',))
    try:
      pod.wait_for(f'[gendd] resumed from step {resumed_from}')
      deadline = time.time() + 120
      while (max(_committed(workdir)) == resumed_from and
             time.time() < deadline):
        time.sleep(0.05)
      pod.procs[1].send_signal(signal.SIGKILL)
      killed = time.time()
      pod.procs[0].wait(timeout=120)
      elapsed = time.time() - killed
    finally:
      pod.kill()
    survivor = pod.output(0)
    self.assertEqual(pod.procs[0].returncode, 7, survivor[-2000:])
    self.assertLess(elapsed, 120)
    self.assertRegex(survivor, r'error: lost process 1 of 2: it stopped '
                     'responding')
    self.assertGreater(max(_committed(workdir)), resumed_from)


if __name__ == '__main__':
  absltest.main()
