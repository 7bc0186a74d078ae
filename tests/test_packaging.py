"""`pip install .` gives working commands: in a fresh virtual environment
(seeing this one's packages, so nothing is downloaded) the declared
dependencies are met by the pinned set with nothing changed, `pip check`
passes, every console script answers `--help` with its own command's
description, and `gendd-train --config=configs/digits.py:quick` runs the
whole quick pipeline from outside the repository."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import tempfile
import tomllib

from absl.testing import absltest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import testing

# Console script -> (module, a flag its --help must list).
_SCRIPTS = {
    'gendd-train': ('gendd_jax.main', '--workdir'),
    'gendd-evaluate': ('gendd_jax.cli.evaluate', '--checkpoint'),
    'gendd-export': ('gendd_jax.cli.export', '--step'),
    'gendd-convert': ('gendd_jax.cli.convert', '--arch'),
    'gendd-zoo': ('gendd_jax.cli.zoo', '--[no]list'),
    'gendd-build-dataset': ('gendd_jax.cli.build_dataset', '--src'),
    'gendd-precompute': ('gendd_jax.cli.precompute', '--workdir'),
    'gendd-sweep-sampling': ('gendd_jax.cli.sweep_sampling', '--runs'),
}


def _pyproject() -> dict:
  with open(os.path.join(testing.ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def _pins() -> dict[str, str]:
  """requirements.txt as {canonical name: pinned version}."""
  pins = {}
  with open(os.path.join(testing.ROOT, 'requirements.txt')) as f:
    for line in f:
      line = line.split('#')[0].strip()
      if line:
        req = Requirement(line)  # Extras allowed: etils[epath]==1.15.0.
        (spec,) = req.specifier
        if spec.operator != '==':
          raise ValueError(f'requirements.txt pins with ==, not: {line}')
        pins[canonicalize_name(req.name)] = spec.version
  return pins


class DeclarationTest(absltest.TestCase):

  def test_dependencies_mirror_the_pinned_set(self):
    declared = {canonicalize_name(r.name): r for r in map(
        Requirement, _pyproject()['project']['dependencies'])}
    pins = _pins()
    self.assertEqual(set(declared), set(pins))
    for name, version in pins.items():
      self.assertTrue(declared[name].specifier.contains(version),
                      f'{declared[name]} excludes the pinned {version}')

  def test_scripts_name_entry_functions(self):
    scripts = _pyproject()['project']['scripts']
    self.assertEqual(set(scripts), set(_SCRIPTS))
    for script, target in scripts.items():
      module, func = target.split(':')
      self.assertEqual(module, _SCRIPTS[script][0])
      self.assertTrue(callable(getattr(importlib.import_module(module),
                                       func)), target)


class InstalledTest(absltest.TestCase):
  """One install shared by the tests (it is the slow part)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory(prefix='gendd_pkg_')
    cls.tmp = cls._tmp.name
    cls.python = testing.fresh_venv(os.path.join(cls.tmp, 'venv'))
    cls.bin = os.path.dirname(cls.python)
    # Not the repository: the installed package must be what runs.
    cls.env = {k: v for k, v in testing.subprocess_env().items()
               if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    cls.env['PATH'] = cls.bin + os.pathsep + cls.env.get('PATH', '')
    src = testing.copy_source(os.path.join(cls.tmp, 'src'))
    # --no-index: a dependency the environment lacks fails the install
    # instead of being downloaded.
    cls.install = cls._run(
        [cls.python, '-m', 'pip', 'install', '--no-build-isolation',
         '--no-index', '--disable-pip-version-check', src])

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  @classmethod
  def _run(cls, argv, **kwargs):
    return subprocess.run(argv, cwd=cls.tmp, env=cls.env,
                          capture_output=True, text=True, **kwargs)

  def test_install_changes_nothing_but_the_package(self):
    out = self.install.stdout + self.install.stderr
    self.assertEqual(self.install.returncode, 0, out[-3000:])
    installed = re.findall(r'^Successfully installed (.*)$', out, re.M)
    self.assertEqual(installed, ['gendd_jax-0.1.0'], out[-3000:])
    self.assertIn('Requirement already satisfied: jax<0.11,>=0.10.2', out)
    check = self._run([self.python, '-m', 'pip', 'check'])
    self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
    where = self._run([self.python, '-c',
                       'import gendd_jax; print(gendd_jax.__file__)'])
    self.assertTrue(where.stdout.startswith(os.path.join(self.tmp, 'venv')),
                    where.stdout + where.stderr)

  def test_every_script_answers_help(self):
    procs = {s: subprocess.Popen(
        [os.path.join(self.bin, s), '--help'], cwd=self.tmp, env=self.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in _SCRIPTS}
    for script, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=300)
      self.assertEqual(proc.returncode, 0, f'{script}: {stderr[-2000:]}')
      module, flag = _SCRIPTS[script]
      summary = importlib.import_module(module).__doc__.strip().splitlines()
      self.assertIn(summary[0], stdout, script)  # Its own docstring,
      self.assertIn(f'  {flag}', stdout, script)  # and its own flags.

  def test_bad_use_is_one_error(self):
    cases = [
        (['gendd-train', '--workdir=run'],
         'error: both --config and --workdir are required'),
        # A flag of another command (evaluate's sampling steps) is refused,
        # not ignored.
        (['gendd-sweep-sampling', '--runs=none*', '--out=sweep', '--steps=4'],
         'error: --steps: not a flag of this command (see --help)'),
        # The old name of --out still works (the error is the next check's).
        (['gendd-sweep-sampling', '--runs=none*', '--output_prefix=sweep'],
         'error: no run directory matches none*'),
    ]
    procs = [(subprocess.Popen(
        [os.path.join(self.bin, argv[0]), *argv[1:]], cwd=self.tmp,
        env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True), message) for argv, message in cases]
    for proc, message in procs:
      _, stderr = proc.communicate(timeout=300)
      self.assertEqual(proc.returncode, 2, stderr[-2000:])
      self.assertEqual(stderr.strip().splitlines()[-1], message)

  def test_train_runs_the_quick_pipeline(self):
    # The documented command as it stands, from outside the repository:
    # every stage of both folds, the results table at the end. `~` is
    # expanded by the command (no shell here).
    workdir = os.path.join(self.tmp, 'run')
    proc = subprocess.run([
        os.path.join(self.bin, 'gendd-train'),
        f'--config={testing.CONFIGS}/digits.py:quick', '--workdir=~/run'],
        cwd=self.tmp, env=dict(self.env, HOME=self.tmp), capture_output=True,
        text=True, timeout=1500)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    with open(os.path.join(workdir, 'results.md')) as f:
      table = f.read()
    # The default samples with x0 clipped; the paper's sampler is its own
    # row ('as published').
    self.assertEqual(set(results['methods']), {
        'teacher', 'scratch', 'kd', 'stage1', 'gendd', 'gendd_published',
        'gendd_probe', 'kl', 'gendd_unsup', 'gendd_unsup_published'})
    for key, m in results['methods'].items():
      self.assertEqual(m['num_images'], 1797, key)  # Every image once.
      self.assertBetween(m['mean'], 0.0, 100.0, key)
    self.assertGreater(results['methods']['teacher']['mean'], 50.0)
    self.assertIn(table.strip(), proc.stdout)  # The table is printed.


if __name__ == '__main__':
  absltest.main()
