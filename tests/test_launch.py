"""The launch script's dry run prints the exact command it would run."""

import os
import subprocess

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, 'launch', 'local.sh')


class LaunchTest(absltest.TestCase):

  def test_dry_run(self):
    out = subprocess.run(
        ['bash', _SCRIPT, '--dry-run', 'configs/digits.py', 'runs/x',
         '--config.seed=3'], capture_output=True, text=True, check=True)
    self.assertEqual(
        out.stdout.strip(),
        'python -m gendd_jax.main --config=configs/digits.py '
        '--workdir=runs/x --config.seed=3')

  def test_usage_error(self):
    out = subprocess.run(['bash', _SCRIPT, 'configs/digits.py'],
                         capture_output=True, text=True)
    self.assertEqual(out.returncode, 2)
    self.assertIn('usage:', out.stderr)


if __name__ == '__main__':
  absltest.main()
