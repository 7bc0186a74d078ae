"""The Colab demo: it executes headlessly, end to end, in its quick mode; and
its set-up cells (finding the source, installing what the runtime lacks)
run as on a fresh runtime, in new virtual environments: from an uploaded
zip with a dependency missing, from a clone of `REPO_URL`, and with no
source at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from absl.testing import absltest
import nbclient
import nbformat

import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOK = os.path.join(_ROOT, 'launch', 'colab_demo.ipynb')
# Run after the set-up cells: where the source and the packages came from.
_CHECK = """
import json, gendd_jax
print('CHECK ' + json.dumps(dict(
    src=SRC, package=gendd_jax.__file__,
    ml_collections=importlib.util.find_spec('ml_collections').origin)))
"""


def _tagged_code(tag: str) -> str:
  """The source of the notebook's code cell tagged `tag`."""
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'{len(cells)} cells tagged {tag}'
  return cells[0].source


class NotebookTest(absltest.TestCase):

  def test_executes_in_quick_mode(self):
    nb = nbformat.read(_NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory(prefix='gendd_demo_') as tmp:
      os.environ['GENDD_DEMO_QUICK'] = '1'
      os.environ['GENDD_DEMO_WORKDIR'] = tmp
      try:
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name='python3',
            resources={'metadata': {'path': os.path.dirname(_NOTEBOOK)}}
        ).execute()
      finally:
        for k in ('GENDD_DEMO_QUICK', 'GENDD_DEMO_WORKDIR'):
          os.environ.pop(k)
      self.assertTrue(os.path.exists(os.path.join(tmp, 'gendd',
                                                  'results.json')))
    outputs = [o for c in nb.cells if c.cell_type == 'code'
               for o in c.get('outputs', [])]
    self.assertFalse([o for o in outputs if o.output_type == 'error'])
    figures = [o for o in outputs if 'image/png' in o.get('data', {})]
    self.assertGreaterEqual(len(figures), 3)  # Curves, accuracy, PCA.
    text = ''.join(o.get('text', '') for o in outputs)
    self.assertIn('quick mode', text)
    self.assertIn('every dependency is installed already', text)
    # The whole training log is shown, the first stage's progress included.
    self.assertRegex(text, r'\[teacher\] step \d+/\d+ loss')
    self.assertRegex(text, r'\[gendd\] step \d+/\d+ loss')
    self.assertRegex(text, r'ancestral +16 steps: top-1 +[\d.]+%')
    self.assertRegex(text, r'probe: top-1 [\d.]+%')
    self.assertIn('mean cosine(sample, teacher feature)', text)

  def test_metadata_requests_no_accelerator(self):
    nb = nbformat.read(_NOTEBOOK, as_version=4)
    self.assertNotIn('accelerator', nb.metadata)
    self.assertNotIn('gpuType', nb.metadata.get('colab', {}))


class SetupCellsTest(absltest.TestCase):
  """The set-up cells as a fresh runtime runs them: their code in a new
  virtual environment's python, started in an empty directory (Colab's
  /content)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory(prefix='gendd_setup_')
    cls.tmp = cls._tmp.name
    # The repository as GitHub's "Download ZIP" gives it.
    files = subprocess.run(
        ['git', 'ls-files', '-co', '--exclude-standard'], cwd=_ROOT,
        capture_output=True, text=True, check=True).stdout.split()
    cls.zip = os.path.join(cls.tmp, 'gendd-jax-main.zip')
    with zipfile.ZipFile(cls.zip, 'w') as z:
      for f in files:
        if os.path.isfile(os.path.join(_ROOT, f)):
          z.write(os.path.join(_ROOT, f), f'gendd-jax-main/{f}')

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def _dir(self, name: str) -> str:
    path = os.path.join(self.tmp, name)
    os.makedirs(path)
    return path

  def _run_cells(self, python: str, cwd: str, tags: tuple[str, ...],
                 extra: str = '', **env: str) -> subprocess.CompletedProcess:
    script = os.path.join(cwd, '..', os.path.basename(cwd) + '_cells.py')
    with open(script, 'w') as f:
      f.write('\n\n'.join(_tagged_code(t) for t in tags) + '\n' + extra)
    environ = {k: v for k, v in testing.subprocess_env().items()
               if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'GENDD_REPO_URL',
                            'GENDD_DEMO_QUICK', 'GENDD_DEMO_WORKDIR')}
    return subprocess.run([python, script], cwd=cwd, capture_output=True,
                          text=True, env={**environ, **env}, timeout=600)

  def _check(self, proc) -> dict:
    self.assertEqual(proc.returncode, 0, proc.stdout[-2000:] +
                     proc.stderr[-3000:])
    line = [x for x in proc.stdout.splitlines() if x.startswith('CHECK ')]
    return json.loads(line[-1][len('CHECK '):])

  def test_uploaded_zip_and_a_missing_package(self):
    venv = os.path.join(self.tmp, 'venv_zip')
    python = testing.fresh_venv(venv, hide=('ml_collections',))
    hidden = subprocess.run([python, '-c', 'import ml_collections'],
                            capture_output=True)
    self.assertNotEqual(hidden.returncode, 0)  # The runtime lacks it.
    wheels = testing.installed_wheel('ml_collections',
                                     os.path.join(self.tmp, 'wheels'))
    content = self._dir('content_zip')
    shutil.copy(self.zip, content)  # The upload.
    proc = self._run_cells(
        python, content, ('gendd-source', 'gendd-install'), _CHECK,
        PIP_NO_INDEX='1', PIP_FIND_LINKS=os.path.dirname(wheels))
    check = self._check(proc)
    src = os.path.join(content, 'gendd-jax-upload', 'gendd-jax-main')
    self.assertEqual(check['src'], src)
    self.assertTrue(check['package'].startswith(src + os.sep))
    purelib = subprocess.run(
        [python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
         '["purelib"])'], capture_output=True, text=True).stdout.strip()
    self.assertTrue(check['ml_collections'].startswith(purelib + os.sep))
    self.assertIn('ml_collections==1.1.0', proc.stdout)
    self.assertIn('installed ml_collections', proc.stdout)
    self.assertRegex(proc.stdout, r'JAX [\d.]+ \[CpuDevice')
    # pip only added the missing package: nothing the runtime had changed.
    self.assertEqual(
        {e for e in os.listdir(purelib) if not e.startswith('__')},
        {'gendd_parent_env.pth', 'ml_collections',
         'ml_collections-1.1.0.dist-info'})

  def test_missing_package_that_cannot_be_installed(self):
    python = testing.fresh_venv(os.path.join(self.tmp, 'venv_fail'),
                                hide=('ml_collections',))
    content = self._dir('content_fail')
    shutil.copy(self.zip, content)
    proc = self._run_cells(
        python, content, ('gendd-source', 'gendd-install'),
        PIP_NO_INDEX='1', PIP_FIND_LINKS=self._dir('no_wheels'))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('RuntimeError: Could not add ml_collections', proc.stderr)
    self.assertIn('requirements.txt`, restart the runtime', proc.stderr)

  def test_clone_of_repo_url_then_rerun(self):
    origin = self._dir('origin')
    with zipfile.ZipFile(self.zip) as z:
      z.extractall(origin)
    origin = os.path.join(origin, 'gendd-jax-main')
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@example.com']
    for cmd in (['init', '-q'], ['add', '-A'], ['commit', '-qm', 'source']):
      subprocess.run(git + cmd, cwd=origin, check=True)
    python = testing.fresh_venv(os.path.join(self.tmp, 'venv_clone'))
    content = self._dir('content_clone')
    proc = self._run_cells(python, content, ('gendd-source', 'gendd-install'),
                           _CHECK, GENDD_REPO_URL=f'file://{origin}')
    check = self._check(proc)
    self.assertEqual(check['src'], os.path.join(content, 'gendd-jax'))
    self.assertIn('every dependency is installed already', proc.stdout)
    # Run again without REPO_URL: the earlier clone is found.
    again = self._check(self._run_cells(
        python, content, ('gendd-source',),
        "import json\nprint('CHECK ' + json.dumps(dict(src=SRC)))"))
    self.assertEqual(again['src'], check['src'])

  def test_no_source_says_what_to_do(self):
    content = self._dir('content_empty')
    proc = self._run_cells(sys.executable, content, ('gendd-source',))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(f'RuntimeError: The gendd-jax source is not in {content}.',
                  proc.stderr)
    self.assertIn('set REPO_URL', proc.stderr)
    self.assertIn('upload the repository as a zip', proc.stderr)
    proc = self._run_cells(sys.executable, content, ('gendd-source',),
                           GENDD_REPO_URL=os.path.join(self.tmp, 'nothing'))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('RuntimeError: Cloning REPO_URL=', proc.stderr)


if __name__ == '__main__':
  absltest.main()
