"""Export a run and evaluate it standalone: same accuracy as training-time
evaluation, top-5, images/s, and one clear error for each bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax.cli import evaluate
from gendd_jax.cli import export as export_lib
import testing

_TMP = None
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_export_')
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()
  _TMP.cleanup()


def _run(*args):
  env = testing.subprocess_env()
  return subprocess.run([sys.executable, '-m', *args], capture_output=True,
                        text=True, cwd=_ROOT, env=env, timeout=300)


class ExportEvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir, cls.results = testing.gendd_run()
    cls.out = os.path.join(_TMP.name, 'export_gendd')
    cls.meta = export_lib.export(cls.workdir, cls.out)

  def test_export_holds_what_evaluation_needs(self):
    self.assertEqual(self.meta['stage'], 'gendd')
    self.assertEqual(self.meta['step'], 14)
    meta = ckpt_lib.load_export_meta(self.out)
    self.assertEqual(meta['parts'], ['classifier', 'model'])
    # One format: the run's own final export has the same parts and keys.
    final = ckpt_lib.load_export_meta(os.path.join(self.workdir, 'export'))
    self.assertEqual(final['parts'], meta['parts'])
    self.assertEqual(set(final), set(meta))
    ex = evaluate.load(self.out)
    self.assertEqual(ex.classifier['weight'].shape, (10, 64))
    self.assertIn('head', ex.variables['params'])
    self.assertIn('fc', ex.variables['params']['backbone'])  # The probe.

  def test_matches_training_time_evaluation(self):
    ex = evaluate.load(self.out)
    # Standalone evaluation defaults to the training loop's sampler (the
    # config has no `sampler.eval_*`).
    spec = evaluate.sampler_spec(ex.config,
                                 clip_bound=ex.meta.get('clip_bound'))
    self.assertEqual(spec[:4] + (spec.init_temperature,),
                     ('ancestral', '4', 2.0, 1.0, 1.0))
    probe = evaluate.evaluate(ex, evaluate.eval_batches(ex), 'probe')
    sample = evaluate.evaluate(ex, evaluate.eval_batches(ex), 'sample', spec)
    acc = self.results['accuracy']
    self.assertAlmostEqual(probe['top1'], acc['probe_acc'], places=6)
    # Same weights, data and noise; only XLA's fusion may differ.
    self.assertLessEqual(abs(sample['top1'] - acc['sampled_acc']), 0.25)
    for res in (probe, sample):
      self.assertGreaterEqual(res['top5'], res['top1'])
      self.assertEqual(res['images'], len(self.results['labels']))
      self.assertGreater(res['images_per_sec'], 0)

  def test_final_export_evaluates_like_the_exported_checkpoint(self):
    final = evaluate.load(os.path.join(self.workdir, 'export'))
    ex = evaluate.load(self.out)
    probe_final = evaluate.evaluate(final, evaluate.eval_batches(final),
                                    'probe')
    probe = evaluate.evaluate(ex, evaluate.eval_batches(ex), 'probe')
    self.assertEqual(probe_final['top1'], probe['top1'])
    self.assertEqual(probe_final['top1'],
                     self.results['accuracy']['probe_acc'])

  def test_cli_prints_top1_top5_and_speed(self):
    out_json = os.path.join(_TMP.name, 'eval.json')
    p = _run('gendd_jax.cli.evaluate', f'--checkpoint={self.out}',
             '--sampler=ancestral', '--steps=2',
             '--num_sampling=2', '--cfg_scale=1.5', f'--out={out_json}')
    self.assertEqual(p.returncode, 0, p.stderr[-2000:])
    self.assertRegex(p.stdout, r'sample \(ancestral, 2 steps, cfg 1.5, T 1, '
                     r'2 draw\(s\)\): top-1 [\d.]+%  top-5 [\d.]+%  '
                     r'[\d.]+ images/s')
    self.assertRegex(p.stdout, r'probe: top-1 [\d.]+%')
    default = _run('gendd_jax.cli.evaluate', f'--checkpoint={self.out}',
                   '--mode=sample')
    self.assertEqual(default.returncode, 0, default.stderr[-2000:])
    # The training loop's sampler (tests.testing.small_config: the paper's).
    self.assertIn('sample (ancestral, 4 steps, cfg 2, T 1, 1 draw(s)):',
                  default.stdout)
    with open(out_json) as f:
      res = json.load(f)
    self.assertEqual(res['sample']['sampler']['steps'], '2')
    self.assertEqual(res['sample']['sampler']['num_sampling'], 2)

  def test_two_processes_of_four_devices_equal_one_device(self):
    # Data-parallel over 8 devices in 2 processes (each reading its slice
    # of every batch) gives the numbers of one device: the same hits with
    # the same sampler noise.
    flags = ('gendd_jax.cli.evaluate', f'--checkpoint={self.out}',
             '--mode=both', '--sampler=ancestral', '--steps=2',
             '--batch_size=64')
    one = os.path.join(_TMP.name, 'eval_one.json')
    p = _run(*flags, f'--out={one}')
    self.assertEqual(p.returncode, 0, p.stderr[-2000:])
    two = os.path.join(_TMP.name, 'eval_two.json')
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, '-m', *flags, f'--out={two}', '--distributed',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={i}'], cwd=_ROOT, env=testing.subprocess_env(4),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for proc in procs:
      _, err = proc.communicate(timeout=300)
      self.assertEqual(proc.returncode, 0, err[-2000:])
    with open(one) as f:
      a = json.load(f)
    with open(two) as f:
      b = json.load(f)
    for mode in ('sample', 'probe'):
      self.assertEqual((a[mode]['devices'], b[mode]['devices']), (1, 8))
      self.assertEqual(a[mode]['images'], b[mode]['images'])
      self.assertEqual(a[mode]['images'], len(self.results['labels']))
      for k in ('top1', 'top5'):
        self.assertAlmostEqual(a[mode][k], b[mode][k], delta=1e-5,
                               msg=f'{mode} {k}')

  def _configless(self):
    """An export without a training config, as `cli.convert` writes."""
    path = os.path.join(_TMP.name, 'configless')
    if not os.path.exists(path):
      ex = evaluate.load(self.out)
      ckpt_lib.save_export(path, ex.variables,
                           dict(stage='gendd', num_classes=10))
    return path

  def test_bad_inputs(self):
    cases = [
        (('gendd_jax.cli.export', f'--workdir={self.workdir}',
          f'--out={self.out}'), 'already exists'),
        (('gendd_jax.cli.export', f'--workdir={_TMP.name}/none',
          f'--out={_TMP.name}/x'), 'no checkpoint or final export'),
        (('gendd_jax.cli.export', f'--workdir={self.workdir}',
          f'--out={_TMP.name}/y', '--step=3'), 'no checkpoint for step 3'),
        (('gendd_jax.cli.evaluate', f'--checkpoint={self._configless()}'),
         'holds no training config'),
        (('gendd_jax.cli.evaluate', f'--checkpoint={self.out}',
          '--mode=logits'), "mode 'logits' is for classifier exports"),
        (('gendd_jax.cli.evaluate', f'--checkpoint={_TMP.name}/missing'),
         'missing meta.json'),
    ]
    for args, message in cases:
      p = _run(*args)
      self.assertEqual(p.returncode, 2, (args, p.stderr[-1500:]))
      self.assertIn(message, p.stderr)
      self.assertEqual(p.stderr.count('error:'), 1, p.stderr)
    self.assertFalse(os.path.exists(f'{_TMP.name}/x'))

  def test_corrupt_export_weights(self):
    bad = os.path.join(_TMP.name, 'corrupt')
    export_lib.export(self.workdir, bad)
    for root, _, files in os.walk(os.path.join(bad, 'weights')):
      for f in files:
        if not f.endswith('.json'):
          with open(os.path.join(root, f), 'wb') as fh:
            fh.write(b'garbage')
    with self.assertRaises(ckpt_lib.CheckpointError):
      ex = evaluate.load(bad)
      evaluate.evaluate(ex, evaluate.eval_batches(ex), 'probe')


class BackboneExportTest(absltest.TestCase):

  def test_teacher_export_evaluates_logits(self):
    export_dir, res = testing.teacher_export()
    workdir = os.path.dirname(export_dir)
    out = os.path.join(_TMP.name, 'export_teacher')
    export_lib.export(workdir, out)
    ex = evaluate.load(out)
    self.assertEqual(evaluate.modes_of(ex, None), ('logits',))
    r = evaluate.evaluate(ex, evaluate.eval_batches(ex), 'logits')
    self.assertAlmostEqual(r['top1'], res['accuracy']['acc'], places=6)
    with self.assertRaisesRegex(ValueError, 'no diffusion head'):
      evaluate.modes_of(ex, 'sample')


if __name__ == '__main__':
  absltest.main()
