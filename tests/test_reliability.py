"""Preemption and bad input, end to end through `python -m gendd_jax.main`.

* kill -9 at a random step, then the same command (which takes over the
  stale workdir lock), then SIGTERM: a checkpoint is saved and the process
  exits 0 within the grace period; the same command then finishes, and the
  final weights equal an uninterrupted run's bit for bit (one process: the
  Python SIGTERM handler; several processes, a corrupt checkpoint and the
  refused resumes: tests/test_pod.py);
* a non-finite loss stops the run naming the step and the last good
  checkpoint, or (on_nonfinite=skip) the step is skipped;
* the bad-input matrix: one `error:` line, non-zero exit, nothing lost.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import numpy as np
import orbax.checkpoint as ocp

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import data as data_lib
from gendd_jax import train
from gendd_jax import errors
import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMP = None
_GRACE_SECONDS = 30


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_reliability_')
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()
  _TMP.cleanup()


def _args(workdir, *extra):
  """A 42-step GenDD stage checkpointing every 3 steps, logging each."""
  return ['--config=configs/digits.py:quick', f'--workdir={workdir}',
          '--config.stage=gendd',
          f'--config.teacher.checkpoint={testing.teacher_export()[0]}',
          '--config.gendd.width=32', '--config.gendd.depth=1',
          '--config.sampler.steps=4',
          '--config.sampler.also_eval_clipped=False',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=3',
          '--config.keep_checkpoints=20', '--config.stages.gendd.epochs=6',
          *extra]


def _env():
  return testing.subprocess_env()


def _run(args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'gendd_jax.main', *args],
                        cwd=_ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _start(args):
  return subprocess.Popen([sys.executable, '-u', '-m', 'gendd_jax.main',
                           *args], cwd=_ROOT, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(proc, step) -> list[str]:
  """Reads the child's output until it reports `step`."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f'[gendd] step {step}/' in line:
      return lines
  raise AssertionError('the run ended before step %d:\n%s' %
                       (step, ''.join(lines[-30:])))


class PreemptionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference = os.path.join(_TMP.name, 'uninterrupted')
    proc = _run(_args(cls.reference))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls.reference_weights = testing.export_weights(cls.reference)

  def assertSameWeights(self, workdir):
    got = testing.export_weights(workdir)
    self.assertEqual(set(got), set(self.reference_weights))
    for k, v in self.reference_weights.items():
      np.testing.assert_array_equal(got[k], v, err_msg=k)

  def test_kill_9_at_a_random_step_then_sigterm_then_bit_exact(self):
    # Replay a run with GENDD_KILL_SEED=<seed printed below> (or pick the
    # step itself with GENDD_KILL_STEP=<4..30>).
    seed = int(os.environ.get('GENDD_KILL_SEED', time.time_ns()))
    kill_at = int(os.environ.get('GENDD_KILL_STEP', 0)) or random.Random(
        seed).randint(4, 30)
    replay = (f'kill -9 at step {kill_at}: replay with '
              f'GENDD_KILL_SEED={seed} (or GENDD_KILL_STEP={kill_at})')
    print(replay, flush=True)
    workdir = os.path.join(_TMP.name, f'killed_at_{kill_at}')
    proc = _start(_args(workdir))
    try:
      _wait_for_step(proc, kill_at)
      # Saves are asynchronous: kill once one has been committed, so the
      # restart has something to resume from.
      ckpts = os.path.join(workdir, 'checkpoints')
      deadline = time.time() + 60
      while proc.poll() is None and time.time() < deadline and not any(
          d.isdigit() for d in os.listdir(ckpts)):
        time.sleep(0.01)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait(60)
    self.assertEqual(proc.returncode, -signal.SIGKILL, replay)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'export')), replay)
    committed = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    # The same command resumes (taking over the lock the killed run left);
    # a SIGTERM three steps later saves and exits 0 within the grace period.
    proc = _start(_args(workdir))
    try:
      lines = _wait_for_step(proc, committed + 3)
      sent = time.time()
      proc.send_signal(signal.SIGTERM)
      out, _ = proc.communicate(timeout=_GRACE_SECONDS)
      elapsed = time.time() - sent
    finally:
      if proc.poll() is None:
        proc.kill()
    out = ''.join(lines) + out
    self.assertEqual(proc.returncode, 0, f'{replay}\n{out[-3000:]}')
    self.assertIn(f'[gendd] resumed from step {committed}', out, replay)
    self.assertIn('taking over the stale lock', out, replay)
    self.assertLess(elapsed, _GRACE_SECONDS)
    self.assertRegex(out, r'SIGTERM: saved checkpoint (\d+) of .* [\d.]+s '
                     'after the signal')
    saved = int(out.split('SIGTERM: saved checkpoint ')[1].split()[0])
    self.assertBetween(saved, committed + 3, 41, replay)
    self.assertTrue(os.path.isdir(os.path.join(ckpts, str(saved))))
    again = _run(_args(workdir))
    self.assertEqual(again.returncode, 0,
                     f'{replay}\n{again.stderr[-3000:]}')
    self.assertIn(f'resumed from step {saved}', again.stdout, replay)
    try:
      self.assertSameWeights(workdir)
    except AssertionError as e:
      raise AssertionError(f'{replay}\n{e}') from None


def _nan_at(step_index):
  """Patches the in-memory stream so batch `step_index` holds a NaN."""
  original = data_lib.ArrayStream.__next__

  def poisoned(self):
    i = self.step
    batch = original(self)
    if i == step_index:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return batch
  return mock.patch.object(data_lib.ArrayStream, '__next__', poisoned)


class NonFiniteTest(absltest.TestCase):

  def _config(self, mode):
    testing.teacher_export()  # Trained before the stream is patched.
    c = testing.gendd_config()
    c.checkpoint_every_steps = 3
    c.on_nonfinite = mode
    return c

  def test_stop_names_the_step_and_last_good_checkpoint(self):
    config = self._config('stop')
    with _nan_at(7), self.assertRaisesRegex(
        errors.NonFiniteError, r'step 8 of .*last good checkpoint: 6'):
      train.train_and_evaluate(config,
                               os.path.join(_TMP.name, 'nan_stop'),
                               quiet=True)
    ckpt = ckpt_lib.Checkpointer(os.path.join(_TMP.name, 'nan_stop',
                                              'checkpoints'))
    try:
      self.assertEqual(ckpt.all_steps(), [3, 6])
    finally:
      ckpt.close()

  def test_skip_leaves_the_state_untouched(self):
    config = self._config('skip')
    with _nan_at(7):
      res = train.train_and_evaluate(config,
                                     os.path.join(_TMP.name, 'nan_skip'),
                                     quiet=True)
    self.assertEqual(res['skipped_nonfinite_steps'], [8])
    weights = testing.export_weights(os.path.join(_TMP.name, 'nan_skip'))
    self.assertNotEmpty(weights)
    for v in weights.values():
      self.assertTrue(np.all(np.isfinite(v)))

  def test_unknown_mode(self):
    with self.assertRaisesRegex(errors.ConfigError, 'on_nonfinite'):
      train.train_and_evaluate(self._config('ignore'),
                               os.path.join(_TMP.name, 'nan_bad'), quiet=True)


class BadInputTest(absltest.TestCase):
  """Each: exit status 2, stderr ending in one `error:` line, no traceback,
  nothing already written lost."""

  def assertUserError(self, proc, *needles):
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    self.assertTrue(lines[-1].startswith('error: '), lines[-3:])
    self.assertEqual(sum(ln.startswith('error: ') for ln in lines), 1)
    self.assertNotIn('Traceback', proc.stderr)
    for n in needles:
      self.assertIn(n, lines[-1])

  def test_wrong_type_in_override(self):
    self.assertUserError(_run(_args(os.path.join(_TMP.name, 'w1'),
                                    '--config.seed=abc')), 'seed')
    self.assertUserError(_run(_args(os.path.join(_TMP.name, 'w2'),
                                    '--config.gendd.width=1.5')), 'width')

  def test_stage1_projection_for_another_teacher_width(self):
    # Stage-1 projects the 32-d student feature to the 64-d teacher's; a
    # GenDD run whose teacher is 48-d cannot start from it.
    s1 = os.path.join(_TMP.name, 'stage1')
    c = testing.small_config('stage1')
    c.teacher.checkpoint = testing.teacher_export()[0]
    train.train_and_evaluate(c, s1, quiet=True)
    other = os.path.join(_TMP.name, 'teacher48')
    t = testing.small_config('teacher')
    t.teacher.hidden = (256, 48)
    train.train_and_evaluate(t, other, quiet=True)
    proc = _run(_args(os.path.join(_TMP.name, 'w3'),
                      f'--config.teacher.checkpoint={other}/export',
                      '--config.teacher.hidden=(256, 48)',
                      f'--config.student.init_from={s1}/export'))
    self.assertUserError(proc, 'proj', '(64,)', '(48,)')

  def test_label_count_differs_from_teacher_classifier(self):
    export = os.path.join(_TMP.name, 'teacher_5_classes')
    shutil.copytree(testing.teacher_export()[0], export)
    meta_path = os.path.join(export, 'meta.json')
    with open(meta_path) as f:
      meta = json.load(f)
    meta['num_classes'] = 5
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    proc = _run(_args(os.path.join(_TMP.name, 'w4'),
                      f'--config.teacher.checkpoint={export}'))
    self.assertUserError(proc, '5 classes', 'dataset has 10')

  def test_full_disk_on_save_keeps_earlier_checkpoints(self):
    workdir = os.path.join(_TMP.name, 'disk_full')
    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
      if step >= 6:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return real_save(self, step, *a, **k)

    c = testing.gendd_config()
    c.checkpoint_every_steps = 3
    with mock.patch.object(ocp.CheckpointManager, 'save', save), \
        self.assertRaisesRegex(ckpt_lib.CheckpointError,
                               'could not save checkpoint 6 .*No space left '
                               'on device; the earlier checkpoints are '
                               'intact'):
      train.train_and_evaluate(c, workdir, quiet=True)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
    try:
      self.assertEqual(ckpt.all_steps(), [3])
      ckpt.restore(None, 3)  # Still readable.
    finally:
      ckpt.close()


if __name__ == '__main__':
  absltest.main()
