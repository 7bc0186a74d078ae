"""Estimated training times: the arithmetic, the line a run prints, and the
configs' docstrings and `docs/walltime.md` against the configs' schedules."""

from __future__ import annotations

import contextlib
import io

from absl.testing import absltest

from gendd_jax import train
from gendd_jax import walltime
import testing
from tools import walltime as tool


def setUpModule():
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()


class WallTimeTest(absltest.TestCase):

  def test_peaks_and_arithmetic(self):
    self.assertEqual(walltime.peak_tflops('TPU v4'), 275.0)
    self.assertEqual(walltime.peak_tflops('TPU v5 lite'), 197.0)
    self.assertEqual(walltime.peak_tflops('NVIDIA H100 80GB HBM3'), 989.0)
    self.assertIsNone(walltime.peak_tflops('cpu'))
    # 1e18 FLOPs on 4 chips of 275 TFLOP/s at the assumed utilisation.
    secs = walltime.seconds(1e18, 'TPU v4', 4)
    self.assertAlmostEqual(secs, 1e18 / (4 * 275e12 * walltime.UTILISATION))
    self.assertIn('estimated', walltime.describe(secs, 'TPU v4', 4))
    self.assertIn('no estimate', walltime.describe(None, 'cpu', 1))
    self.assertEqual(walltime.amount(30), '< 1 min')
    self.assertEqual(walltime.amount(5400), '~1.5 h')
    self.assertEqual(walltime.amount(3 * 86400), '~3.0 days')

  def test_configs_and_table_agree_with_the_schedules(self):
    table = tool.load_table()
    self.assertEqual(tool.problems(table), [])
    # The check follows the schedule: twice the epochs is another claim.
    arg = 'r18_from_r34'
    est = tool.estimate(arg, table[arg]['flops_per_example'])
    doubled = {k: 2 * v for k, v in table[arg]['flops_per_example'].items()}
    self.assertNotEqual(tool.expected_claim(arg, est),
                        tool.expected_claim(arg, tool.estimate(arg, doubled)))

  def test_a_run_prints_its_estimate_after_the_first_step(self):
    config = testing.small_config('teacher', epochs=1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      train.train_and_evaluate(config, testing.workdir('walltime'))
    text = out.getvalue()
    self.assertRegex(text, r'\[teacher\] [\d.e+-]+ GFLOP per step; 7 steps: ')
    # On CPU (no known peak) the estimate names the reference accelerator.
    self.assertIn(f'on {walltime.REFERENCE[1]} x {walltime.REFERENCE[0]} '
                  '(estimated', text)


if __name__ == '__main__':
  absltest.main()
