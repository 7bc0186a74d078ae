"""The twin-sampler experiment: its settings, its epsilon-error measurement,
its batches, a tiny run's record, and its refusal without the reference.

The authors' side runs only where a local copy of their code exists
(`GENDD_REFERENCE`, default /tmp/gendd_ref); everything else needs none.
"""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from experiments import twin_sampler
from tests import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_setup(**overrides) -> twin_sampler.HeadSetup:
  kwargs = dict(
      token_dim=4, width=16, depth=1, diffusion_batch_mul=2,
      cond_drop_prob=0.2, use_vb=True, noise_schedule='cosine',
      diffusion_steps=1000, sampling_steps='4', cfg_scale=2.0,
      temperature=1.0, lr=1e-3, warmup_steps=2, beta2_min=0.95,
      beta2_max=0.999, beta2_steps=20, batch_size=8)
  kwargs.update(overrides)
  return twin_sampler.HeadSetup(**kwargs)


def _tiny_features(seed=0, n_train=40, n_test=12, dz=6, d=8, classes=3
                   ) -> twin_sampler.Features:
  """Class-structured random features: teacher rows near their class's
  classifier row, student rows a noisy linear view of them."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((classes, d)).astype(np.float32)
  proj = rng.standard_normal((d, dz)).astype(np.float32)

  def split(n):
    y = rng.integers(0, classes, n).astype(np.int32)
    t = (w[y] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)
    f = (t @ proj + 0.1 * rng.standard_normal((n, dz))).astype(np.float32)
    return f, t, y

  f_tr, t_tr, y_tr = split(n_train)
  f_te, t_te, y_te = split(n_test)
  bound = float(max(np.abs(t_tr).max(), np.abs(w).max()))
  return twin_sampler.Features(f_tr, t_tr, y_tr, f_te, t_te, y_te, w,
                               np.zeros(classes, np.float32), bound)


class SetupTest(absltest.TestCase):

  def test_digits_gendd_stage(self):
    config = testing.load_config('digits', None)
    s = twin_sampler.head_setup(config, num_train=1437)
    self.assertEqual((s.token_dim, s.width, s.depth, s.diffusion_batch_mul),
                     (16, 128, 3, 1))
    self.assertEqual((s.cond_drop_prob, s.use_vb, s.sampling_steps,
                      s.cfg_scale), (0.2, True, '64', 2.0))
    # 11 steps per epoch: 5 warm-up epochs, beta2 over the 80-epoch run.
    self.assertEqual((s.warmup_steps, s.beta2_steps, s.batch_size),
                     (55, 880, 128))
    spec = s.optim_spec()
    self.assertEqual((spec.weight_decay, spec.schedule), (0.0, 'constant'))


class BatchTest(absltest.TestCase):

  def test_epochs_are_permutations_and_reproducible(self):
    idx = twin_sampler.batch_indices(10, 3, seed=0, start=0, count=6)
    self.assertEqual(idx.shape, (6, 3))
    for epoch in range(2):  # 3 batches of 3 per epoch (drop remainder).
      rows = idx[3 * epoch:3 * epoch + 3].ravel()
      self.assertLen(set(rows.tolist()), 9)
    np.testing.assert_array_equal(
        twin_sampler.batch_indices(10, 3, seed=0, start=4, count=2), idx[4:])
    self.assertFalse(np.array_equal(
        twin_sampler.batch_indices(10, 3, seed=1, start=0, count=6), idx))


class EpsErrorTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.feats = _tiny_features()
    self.probe = twin_sampler.eps_probe(self.feats, _tiny_setup(),
                                        (999, 500, 100), draws=2)

  def _noise(self, x, t):
    i = int(np.flatnonzero(self.probe.timesteps == t)[0])
    np.testing.assert_array_equal(x, self.probe.x_t[i])
    return self.probe.noise[i]

  def test_probe_rows(self):
    p = self.probe
    rows = 2 * len(self.feats.t_test) * 2  # draws x images x tokens.
    self.assertEqual(p.x0.shape, (rows, 4))
    self.assertEqual(p.f.shape, (rows, 6))
    self.assertEqual(p.x_t.shape, (3, rows, 4))
    # Token k of image i is feature columns 4k..4k+3 of image i.
    np.testing.assert_array_equal(p.x0[1], self.feats.t_test[0, 4:8])
    np.testing.assert_array_equal(p.token[:4], [0, 1, 0, 1])

  def test_oracle_has_no_error(self):
    errs = twin_sampler.eps_errors(
        lambda x, t, f, k, null: self._noise(x, t), self.probe, 2.0)
    self.assertEqual(sorted(errs), ['100', '500', '999'])
    for e in errs.values():
      self.assertEqual((e['cond'], e['uncond'], e['guided']), (0.0, 0.0, 0.0))

  def test_guidance_combines_the_branches(self):
    # cond = eps + 0.1, uncond = eps - 0.2: guided = eps + 0.4.
    def fn(x, t, f, k, null):
      return self._noise(x, t) + (-0.2 if null else 0.1)
    e = twin_sampler.eps_errors(fn, self.probe, 2.0)['500']
    self.assertAlmostEqual(e['cond'], 0.01, places=6)
    self.assertAlmostEqual(e['uncond'], 0.04, places=6)
    self.assertAlmostEqual(e['guided'], 0.16, places=5)

  def test_identity_at_the_last_step_and_x0_gain(self):
    # At t = 999, x_t is almost pure noise: eps_hat = x_t / sqrt(1 - abar)
    # misses by sqrt(abar / (1 - abar)) x0, i.e. error abar/(1-abar) E[x0^2].
    ab = self.probe.alphas_cumprod[0]

    def fn(x, t, f, k, null):
      return x / np.sqrt(1.0 - self.probe.alphas_cumprod[
          int(np.flatnonzero(self.probe.timesteps == t)[0])])
    e = twin_sampler.eps_errors(fn, self.probe, 2.0)['999']
    expected = ab / (1 - ab) * np.mean(self.probe.x0.astype(np.float64) ** 2)
    self.assertAlmostEqual(e['cond'] / expected, 1.0, places=3)
    self.assertAlmostEqual(e['x0_gain'], (1 - ab) / ab)


class TinyRunTest(absltest.TestCase):
  """Our side end to end on tiny features (and theirs where available)."""

  def test_ours_record_and_reports(self):
    feats = _tiny_features()
    partials = []
    record = twin_sampler.run_experiment(
        feats, _tiny_setup(), steps=[10, 20], seeds=[0, 1],
        implementations=['ours'], eps_timesteps=(999, 100), eps_draws=1,
        long_seeds=1, long_steps=10, log=lambda _: None,
        on_progress=partials.append)
    runs = record['runs']
    # A record after every snapshot, each holding the snapshots so far.
    self.assertEqual([len(p['runs']) for p in partials], [1, 2, 3])
    self.assertEqual(partials[-1]['summary'], record['summary'])
    self.assertEqual([(r['seed'], r['steps']) for r in runs],
                     [(0, 10), (0, 20), (1, 10)])
    for r in runs:
      self.assertEqual(r['implementation'], 'ours')
      for variant in ('paper', 'clipped'):
        self.assertTrue(r[variant]['finite'])
        self.assertBetween(r[variant]['top1'], 0.0, 100.0)
        self.assertGreater(r[variant]['norm_ratio_median'], 0.0)
      self.assertEqual(sorted(r['eps_error']), ['100', '999'])
      self.assertTrue(np.isfinite(r['final_loss']))
    self.assertEqual([(s['steps'], s['seeds']) for s in record['summary']],
                     [(10, [0, 1]), (20, [0])])
    text = twin_sampler.markdown(record, 'Concluded.')
    self.assertIn('| 10 | ours | 0,1 |', text)
    self.assertIn('## Conclusion\n\nConcluded.', text)

  def test_merge_joins_runs_of_separate_processes(self):
    feats, setup = _tiny_features(), _tiny_setup()
    kw = dict(eps_timesteps=(999,), eps_draws=1, log=lambda _: None)
    a = twin_sampler.run_experiment(feats, setup, [10], [0], ['ours'], **kw)
    b = twin_sampler.run_experiment(feats, setup, [10], [1], ['ours'], **kw)
    for r, cmd in ((a, 'a'), (b, 'b')):
      r['meta'] = dict(command=cmd, wall_seconds=5.0 if cmd == 'a' else 9.0,
                       machine='m', paused_seconds=60.0 * (cmd == 'b'))
    merged = twin_sampler.merge_records([a, b])
    self.assertEqual([(s['steps'], s['seeds']) for s in merged['summary']],
                     [(10, [0, 1])])
    self.assertEqual(merged['meta']['wall_seconds'], 9.0)
    self.assertEqual(merged['meta']['command'], 'a ; b')
    self.assertIn('the longest of 2 records merged', twin_sampler.markdown(
        merged))
    self.assertIn('1.0 min paused', twin_sampler.markdown(merged))
    with self.assertRaisesRegex(ValueError, 'more than one record'):
      twin_sampler.merge_records([a, a])
    other = twin_sampler.run_experiment(
        feats, _tiny_setup(width=8), [10], [2], ['ours'], **kw)
    with self.assertRaisesRegex(ValueError, "another 'setup'"):
      twin_sampler.merge_records([a, other])

  def test_snapshots_continue_one_run(self):
    feats, setup = _tiny_features(), _tiny_setup()
    a = twin_sampler.Ours(feats, setup, seed=0)
    a.train(6)
    a.train(4)
    b = twin_sampler.Ours(feats, setup, seed=0)
    b.train(10)
    self.assertEqual((a.step, len(a.losses)), (10, 10))
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

  def test_untrained_heads_agree_across_implementations(self):
    if not testing.has_reference():
      self.skipTest(f'no reference code at {testing.REFERENCE}')
    ref = twin_sampler.bench_reference.load(testing.REFERENCE)
    ref.torch.set_num_threads(1)
    feats = _tiny_features()
    record = twin_sampler.run_experiment(
        feats, _tiny_setup(), steps=[0, 5], seeds=[0],
        implementations=['ours', 'theirs'], ref=ref,
        eps_timesteps=(999, 100), eps_draws=1, log=lambda _: None)
    by = {(r['implementation'], r['steps']): r for r in record['runs']}
    # Both heads start with a zero output layer: eps_hat = 0 on the same
    # x_t, so the same error, whatever the other weights.
    for t in ('999', '100'):
      self.assertAlmostEqual(by['ours', 0]['eps_error'][t]['cond'],
                             by['theirs', 0]['eps_error'][t]['cond'],
                             places=6)
    for r in record['runs']:
      self.assertTrue(r['paper']['finite'] and r['clipped']['finite'])


class CommandLineTest(absltest.TestCase):

  def test_missing_reference_fails_clearly(self):
    with tempfile.TemporaryDirectory() as tmp:
      proc = subprocess.run(
          [sys.executable, '-m', 'experiments.twin_sampler',
           f'--reference_dir={os.path.join(tmp, "nowhere")}',
           f'--output_prefix={os.path.join(tmp, "out")}'],
          cwd=_ROOT, capture_output=True, text=True, timeout=300)
      self.assertNotEqual(proc.returncode, 0)
      self.assertIn("cannot use the authors' code", proc.stderr)
      self.assertEqual(os.listdir(tmp), [])


if __name__ == '__main__':
  absltest.main()
