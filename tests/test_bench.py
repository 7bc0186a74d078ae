"""The benchmark runs and reports positive rates (no timing assertions)."""

from absl.testing import absltest

from gendd_jax import bench


class BenchTest(absltest.TestCase):

  def test_head_only_small(self):
    out = bench.bench_head_only(1, 1, feature_dim=64, token_dim=16, width=32,
                                depth=1, mul=2, batch=4, sampling_steps='4')
    self.assertEqual(out['setting']['feature_dim'], 64)
    for part in ('train', 'eval'):
      self.assertGreater(out[part]['images_per_sec'], 0.0)
      self.assertLessEqual(out[part]['min'], out[part]['max'])

  def test_digits(self):
    out = bench.bench_digits(1, 1)
    self.assertEqual(out['setting']['sampling_steps'], '64')
    for part in ('train', 'eval'):
      self.assertGreater(out[part]['images_per_sec'], 0.0)

  def test_cifar_small(self):
    # The CIFAR setting's code path (BatchNorm teacher and student) at a
    # small size; the full-size figures come from `python -m gendd_jax.bench`.
    out = bench.bench_cifar(1, 1, teacher='resnet8', student='resnet8',
                            batch=8, eval_batch=8, width=32, depth=1, mul=2,
                            sampling_steps='4')
    self.assertEqual(out['setting']['teacher'], 'resnet8')
    for part in ('train', 'eval'):
      self.assertGreater(out[part]['images_per_sec'], 0.0)
    pre = bench.bench_cifar(1, 1, teacher='resnet8', student='resnet8',
                            batch=8, eval_batch=8, width=32, depth=1, mul=2,
                            sampling_steps='4', precomputed=True)
    self.assertEqual(pre['setting']['teacher_source'], 'precomputed')
    self.assertGreater(pre['train']['images_per_sec'], 0.0)


if __name__ == '__main__':
  absltest.main()
