"""The command line: bad input fails with one line, the quick pipeline runs.

Every test starts `python -m gendd_jax.main` in a subprocess, as a user
would. User errors must exit with status 2 and end stderr with a single
`error: ...` line, with no traceback.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import testing


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_QUICK = '--config=configs/digits.py:quick'
# Shrinks the quick pipeline further for the tests (about a minute on CPU),
# with the paper's sampler alone: these tests are about the pipeline.
_SMALL = ('--config.gendd.width=32', '--config.gendd.depth=1',
          '--config.gendd.diffusion_batch_mul=1', '--config.sampler.steps=4',
          '--config.sampler.clip_x0=none', '--config.sampler.temperature=1',
          '--config.sampler.init_temperature=1',
          '--config.sampler.also_eval_clipped=False',
          '--config.sampler.also_eval_published=False')
_TMP = None  # A TemporaryDirectory while the module's tests run.


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_main_')


def tearDownModule():
  # The cached runs live in the directory: forget them with it.
  teacher_export.cache_clear()
  _TMP.cleanup()


def run_cli(*args, timeout=300):
  env = testing.subprocess_env()
  return subprocess.run([sys.executable, '-m', 'gendd_jax.main', *args],
                        cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _workdir(name):
  return os.path.join(_TMP.name, name)


@functools.lru_cache(maxsize=None)
def teacher_export():
  """An untrained digits teacher exported as a teacher run would export it."""
  # Imported here: the other tests need no JAX in the test process.
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  from gendd_jax import checkpoint as ckpt_lib
  from gendd_jax import stages
  # pylint: enable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'digits_config', os.path.join(_ROOT, 'configs', 'digits.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('quick')
  info = dict(num_classes=10, input_shape=(64,))
  model = stages.create_backbone(config.teacher, info, 0)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  path = _workdir('teacher_export')
  ckpt_lib.save_export(path, dict(params=params, batch_stats=batch_stats),
                       dict(stage='teacher', num_classes=10))
  return path


class UserErrorTest(parameterized.TestCase):

  def assertUserError(self, proc, *needles):
    """Exit 2, one `error:` line ending stderr, naming every needle."""
    err = proc.stderr
    self.assertEqual(proc.returncode, 2,
                     f'stdout:\n{proc.stdout[-2000:]}\nstderr:\n{err[-4000:]}')
    lines = [line for line in err.splitlines() if line.strip()]
    self.assertNotEmpty(lines, 'empty stderr')
    if 'Traceback' in err:
      self.fail(f'traceback in stderr:\n{err[-3000:]}')
    self.assertTrue(lines[-1].startswith('error: '), err[-4000:])
    self.assertLen([x for x in lines if x.startswith('error:')], 1, err)
    for needle in needles:
      self.assertIn(needle, lines[-1])
    return lines[-1]

  def test_unknown_config_key(self):
    proc = run_cli(_QUICK, '--workdir', _workdir('e_key'), '--config.nope=1')
    self.assertUserError(proc, 'nope')
    self.assertFalse(os.path.exists(_workdir('e_key')))

  def test_unknown_nested_config_key(self):
    proc = run_cli(_QUICK, '--workdir', _workdir('e_key2'),
                   '--config.gendd.tokendim=8')
    self.assertUserError(proc, 'tokendim')

  def test_missing_config_file(self):
    proc = run_cli('--config=configs/does_not_exist.py',
                   '--workdir', _workdir('e_cfg'))
    self.assertUserError(proc, 'does_not_exist.py')

  def test_missing_workdir_flag(self):
    self.assertUserError(run_cli(_QUICK), 'workdir')

  def test_token_dim_not_dividing_teacher_width(self):
    proc = run_cli(_QUICK, '--workdir', _workdir('e_token'),
                   '--config.stage=gendd', '--config.gendd.token_dim=7',
                   f'--config.teacher.checkpoint={teacher_export()}')
    line = self.assertUserError(proc, 'token_dim')
    self.assertIn('7', line)
    self.assertIn('64', line)  # The teacher's feature width.

  def test_unknown_dataset(self):
    proc = run_cli(_QUICK, '--workdir', _workdir('e_data'),
                   '--config.stage=teacher', '--config.data.name=imagenet_nope')
    self.assertUserError(proc, 'imagenet_nope')

  def test_unwritable_workdir(self):
    # Tests run as root, so permissions would not stop the write: put the
    # workdir under a regular file instead.
    blocker = _workdir('a_file')
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, 'w') as f:
      f.write('not a directory')
    workdir = os.path.join(blocker, 'run')
    proc = run_cli(_QUICK, '--workdir', workdir, '--config.stage=teacher')
    self.assertUserError(proc, workdir)

  def test_teacher_checkpoint_not_set(self):
    proc = run_cli(_QUICK, '--workdir', _workdir('e_kd0'), '--config.stage=kd')
    self.assertUserError(proc, 'teacher.checkpoint')

  def test_missing_teacher_checkpoint(self):
    missing = _workdir('no_such_teacher/export')
    proc = run_cli(_QUICK, '--workdir', _workdir('e_kd1'), '--config.stage=kd',
                   f'--config.teacher.checkpoint={missing}')
    self.assertUserError(proc, missing)

  def test_corrupt_teacher_metadata(self):
    bad = _workdir('bad_meta_export')
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(bad, 'meta.json'), 'w') as f:
      f.write('{"num_classes": 10, garbage')
    proc = run_cli(_QUICK, '--workdir', _workdir('e_kd2'), '--config.stage=kd',
                   f'--config.teacher.checkpoint={bad}')
    self.assertUserError(proc, bad)

  def test_corrupt_teacher_weights(self):
    bad = _workdir('bad_weights_export')
    os.makedirs(os.path.join(bad, 'weights'), exist_ok=True)
    with open(os.path.join(bad, 'meta.json'), 'w') as f:
      json.dump(dict(stage='teacher', num_classes=10), f)
    with open(os.path.join(bad, 'weights', 'junk'), 'w') as f:
      f.write('junk')
    proc = run_cli(_QUICK, '--workdir', _workdir('e_kd3'), '--config.stage=kd',
                   f'--config.teacher.checkpoint={bad}')
    self.assertUserError(proc, bad)

  def test_teacher_export_of_another_architecture(self):
    # The export holds a (256, 64) teacher; the config asks for (128, 64).
    proc = run_cli(_QUICK, '--workdir', _workdir('e_kd4'), '--config.stage=kd',
                   f'--config.teacher.checkpoint={teacher_export()}',
                   '--config.teacher.hidden=(128, 64)')
    self.assertUserError(proc, teacher_export())

  @parameterized.named_parameters(
      ('num_devices', '--config.mesh.data=4', 'teacher', 'devices'),
      ('lr_schedule', '--config.stages.teacher.schedule=nope', 'teacher',
       'nope'),
      ('noise_schedule', '--config.gendd.noise_schedule=nope', 'gendd',
       'nope'),
      ('batch_size_zero', '--config.data.batch_size=0', 'teacher', 'batch'),
      ('batch_size_negative', '--config.data.batch_size=-8', 'teacher',
       'batch'),
      ('eval_batch_size_zero', '--config.data.eval_batch_size=0', 'teacher',
       'batch'),
  )
  def test_bad_setting(self, override, stage, needle):
    teacher = [f'--config.teacher.checkpoint={teacher_export()}'
               ] if stage == 'gendd' else []
    proc = run_cli(_QUICK, '--workdir', _workdir(self._testMethodName),
                   f'--config.stage={stage}', override, *teacher)
    self.assertUserError(proc, needle)


class PipelineTest(absltest.TestCase):

  def test_quick_pipeline_then_rerun(self):
    workdir = _workdir('pipeline')
    proc = run_cli(_QUICK, '--workdir', workdir, *_SMALL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    with open(os.path.join(workdir, 'results.md')) as f:
      table = f.read()
    methods = results['methods']
    self.assertEqual(set(methods), {
        'teacher', 'scratch', 'kd', 'stage1', 'gendd', 'gendd_probe', 'kl',
        'gendd_unsup'})
    # Chance is 10%. Measured: teacher 79.9, scratch 27.3, kd 29.9, stage1
    # 21.6, kl 33.8. The GenDD rows (2 epochs) stay at chance; for them the
    # recorded values of this deterministic run, within 1 point for other
    # CPUs' rounding.
    at_chance = dict(gendd=8.514, gendd_probe=9.794, gendd_unsup=8.570)
    for key, m in methods.items():
      self.assertLen(m['per_seed'], 1, key)  # quick: one seed.
      if key in at_chance:
        self.assertAlmostEqual(m['mean'], at_chance[key], delta=1.0,
                               msg=key)
      else:
        self.assertGreater(m['mean'], 15.0, key)
      self.assertIn(f"| {m['label']} | {m['mean']:.2f}", table, key)
      self.assertEqual(m['num_images'], 1797, key)  # Every image once.
    self.assertGreater(methods['teacher']['mean'], 50.0)  # Chance: 10%.
    self.assertIn(table.strip(), proc.stdout)  # The table is printed.
    for fold in (0, 1):
      for stage in ('teacher', 'scratch', 'kd', 'stage1', 'gendd', 'kl',
                    'gendd_unsup'):
        self.assertTrue(os.path.exists(os.path.join(
            workdir, 'seed0', f'fold{fold}', stage, 'results.json')))

    again = run_cli(_QUICK, '--workdir', workdir, *_SMALL)
    self.assertEqual(again.returncode, 0, again.stderr[-4000:])
    progress = [x for x in again.stdout.splitlines() if x.startswith('[')]
    self.assertLen(progress, 14)  # 2 folds x 7 stages.
    for line in progress:
      self.assertIn('done earlier', line)
    with open(os.path.join(workdir, 'results.json')) as f:
      rerun = json.load(f)
    self.assertEqual(rerun['methods'], results['methods'])
    self.assertIn(table.strip(), again.stdout)


class FastCompileTest(absltest.TestCase):
  """`fast_compile` (`:tiny`) reaches XLA: its flags join the user's
  `XLA_FLAGS` before JAX starts its backend, and XLA accepts them."""

  _SCRIPT = '''
import os, sys
import jax
from gendd_jax.cli import common
common.fast_compile()
print(os.environ['XLA_FLAGS'])
print(jax.jit(lambda x: x * 2)(3), jax.device_count())
common.fast_compile()  # Too late now: a warning, no change.
print(os.environ['XLA_FLAGS'])
'''

  def test_flags_added_and_accepted(self):
    env = dict(testing.subprocess_env(),
               XLA_FLAGS='--xla_force_host_platform_device_count=3 '
                         '--xla_backend_optimization_level=1')
    proc = subprocess.run([sys.executable, '-c', self._SCRIPT], cwd=_ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=120)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    first, ran, last = proc.stdout.strip().splitlines()
    # The user's own setting of a flag wins; the missing one is added.
    self.assertEqual(first.split(), [
        '--xla_force_host_platform_device_count=3',
        '--xla_backend_optimization_level=1',
        '--xla_llvm_disable_expensive_passes=true'])
    self.assertEqual(ran, '6 3')
    self.assertEqual(last, first)
    self.assertIn('already started its backend', proc.stderr)

  def test_tiny_turns_it_on_and_the_run_uses_it(self):
    workdir = _workdir('tiny_fast_compile')
    proc = run_cli('--config=configs/digits.py:quick,tiny', '--workdir',
                   workdir, '--config.stage=teacher',
                   '--config.log_every_steps=1')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('fast_compile: XLA compiles without backend optimisation',
                  proc.stdout)
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertIn('accuracy', json.load(f))
    # Off unless asked: the quick config alone does not print it.
    again = run_cli('--config=configs/digits.py:quick,tiny', '--workdir',
                    _workdir('tiny_optimised'), '--config.stage=teacher',
                    '--config.fast_compile=False')
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertNotIn('fast_compile:', again.stdout)


if __name__ == '__main__':
  absltest.main()
