"""Model tests: shapes, parameter counts, initialisation, rematerialisation."""

import inspect

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import config_lib
from gendd_jax import models
from gendd_jax.models import denoiser
from gendd_jax.models import distill


def _count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


class DenoiserTest(absltest.TestCase):

  def test_parameter_count_matches_reference_formula(self):
    # SimpleMLPAdaLN(in=C, model=W, out=2C, z=Dz, blocks=L, chunks=K):
    #   time MLP 256W+W + W*W+W; cond Dz*W+W; pos K*W; input C*W+W;
    #   per block: LN 2W, two W*W+W, adaLN W*3W+3W; final: adaLN W*2W+2W,
    #   linear W*2C+2C (final LN has no parameters).
    c, w, dz, depth, k = 64, 1024, 2048, 3, 32
    net = nnx.eval_shape(lambda: denoiser.DenoiserMLP(
        c, dz, w, depth, k, rngs=nnx.Rngs(0)))
    expected = (256 * w + w + w * w + w + dz * w + w + k * w + c * w + w +
                depth * (2 * w + 2 * (w * w + w) + 3 * w * w + 3 * w) +
                2 * w * w + 2 * w + w * 2 * c + 2 * c)
    self.assertEqual(_count(net), expected)

  def test_zero_initialised_output(self):
    net = denoiser.DenoiserMLP(8, 12, 32, 2, 4, rngs=nnx.Rngs(0))
    out = net(jnp.ones((5, 8)), jnp.arange(5), jnp.ones((5, 12)),
              jnp.arange(5) % 4)
    self.assertEqual(out.shape, (5, 16))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    for block in net.res_blocks:
      np.testing.assert_array_equal(np.asarray(block.adaLN_modulation.kernel),
                                    0.0)

  def test_trunk_broadcasts_conditioning(self):
    net = denoiser.DenoiserMLP(8, 12, 32, 2, 4, rngs=nnx.Rngs(0))
    # Perturb the zero-initialised layers so the output is non-trivial.
    state = nnx.state(net, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    nnx.update(net, jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), state))
    x = jax.random.normal(jax.random.key(2), (3, 5, 4, 8))
    y = jax.random.normal(jax.random.key(3), (4, 32))  # Per token index.
    full = net.trunk(x, jnp.broadcast_to(y, (3, 5, 4, 32)))
    np.testing.assert_allclose(np.asarray(net.trunk(x, y)), np.asarray(full),
                               rtol=1e-6, atol=1e-6)

  def test_remat_gives_same_values_and_gradients(self):
    def run(remat):
      net = denoiser.DenoiserMLP(8, 12, 32, 3, 4, remat=remat,
                                 rngs=nnx.Rngs(0))
      state = nnx.state(net, nnx.Param)
      keys = iter(jax.random.split(jax.random.key(1), 100))
      nnx.update(net, jax.tree.map(
          lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), state))
      graphdef, params = nnx.split(net, nnx.Param)
      x = jax.random.normal(jax.random.key(2), (6, 8))
      t = jnp.arange(6) * 100
      c = jax.random.normal(jax.random.key(3), (6, 12))
      idx = jnp.arange(6) % 4

      def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x, t, c, idx) ** 2)
      return jax.jit(jax.value_and_grad(loss))(params)

    (v0, g0), (v1, g1) = run(False), run(True)
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-6)


class ResNetTest(parameterized.TestCase):

  @parameterized.parameters((18, 11_689_512), (34, 21_797_672),
                            (50, 25_557_032), (101, 44_549_160))
  def test_parameter_count_equals_torchvision(self, depth, expected):
    m = nnx.eval_shape(lambda: models.create_backbone(
        f'resnet{depth}', num_classes=1000, input_shape=(224, 224, 3),
        rngs=nnx.Rngs(0)))
    self.assertEqual(_count(m), expected)

  def test_forward_and_batch_statistics(self):
    m = models.create_backbone('resnet18', num_classes=10,
                               input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) * 3.0 + 1.0
    before = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    eval_feat, eval_logits = m(x)  # Running averages: state unchanged.
    self.assertEqual((eval_feat.shape, eval_logits.shape), ((4, 512), (4, 10)))
    same = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(same)):
      np.testing.assert_array_equal(a, b)
    train_feat, _ = m(x, train=True)  # Batch statistics: state moves.
    after = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    self.assertTrue(all(moved))
    self.assertFalse(np.allclose(np.asarray(train_feat),
                                 np.asarray(eval_feat)))

  @parameterized.parameters(
      ('resnet50', 4, 2048), ('resnext101_32x4d', 4, 2048),
      ('resnet18', 4, 512), ('mobilenet_v1', 6, 1024))
  def test_blocks_keeps_widths_with_one_block_per_stage(self, name, n, dim):
    def build(**kw):
      return nnx.eval_shape(lambda: models.create_backbone(
          name, num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
          **kw))
    full, tiny = build(), build(blocks=1)
    self.assertEqual(tiny.feature_dim, full.feature_dim)
    self.assertEqual(tiny.feature_dim, dim)
    if name.startswith('mobilenet'):  # Stem + the first block per width.
      self.assertLen(tiny.model, n)
      self.assertLen(full.model, 14)
    else:
      self.assertEqual([len(getattr(tiny, f'layer{i}')) for i in (1, 2, 3, 4)],
                       [1] * n)
    self.assertLess(_count(tiny), _count(full))
    with self.assertRaisesRegex(models.ModelError, 'blocks must be'):
      build(blocks=-1 if name.startswith('res') else 2)

  def test_tiny_shrinks_every_model_with_blocks(self):
    # `config_lib.tiny` sets blocks=1 for exactly the models that take it.
    takes = {name for name, fn in models.REGISTRY.items()
             if 'blocks' in inspect.signature(fn).parameters}
    self.assertEqual(set(config_lib._TINY_BLOCKS), takes)

  def test_unknown_setting(self):
    with self.assertRaisesRegex(models.ModelError,
                                r"resnet18: \['depth'\]"):
      models.create_backbone('resnet18', num_classes=10,
                             input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
                             depth=19)


class BackboneTest(absltest.TestCase):

  def test_no_parameter_is_weakly_typed(self):
    # A weakly typed parameter comes back strongly typed from the first
    # update, so the train step would be traced and compiled twice.
    small = {'mlp': dict(hidden=(8,)),
             'beitv2_base_patch16_224': dict(embed_dim=32, depth=1,
                                             num_heads=2),
             'beitv2_large_patch16_224': dict(embed_dim=32, depth=1,
                                              num_heads=2)}
    for name in models.BACKBONES:
      shape = (64,) if name == 'mlp' else (32, 32, 3)
      m = nnx.eval_shape(lambda name=name, shape=shape: models.create_backbone(
          name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0),
          **small.get(name, {})))
      weak = [jax.tree_util.keystr(path) for path, leaf in
              jax.tree_util.tree_leaves_with_path(nnx.state(m))
              if getattr(leaf, 'weak_type', False)]
      self.assertEqual(weak, [], name)
    head = nnx.eval_shape(lambda: denoiser.DenoiserMLP(
        16, 32, 32, 1, 4, rngs=nnx.Rngs(0)))
    self.assertFalse(any(getattr(x, 'weak_type', False)
                         for x in jax.tree.leaves(nnx.state(head))))

  def test_mlp_shapes_and_count(self):
    m = models.create_backbone('mlp', num_classes=10, input_shape=(8, 8),
                               rngs=nnx.Rngs(0), hidden=(256, 64))
    feat, logits = m(jnp.ones((3, 8, 8)))
    self.assertEqual(feat.shape, (3, 64))
    self.assertEqual(logits.shape, (3, 10))
    self.assertEqual(_count(m), 64 * 256 + 256 + 256 * 64 + 64 + 64 * 10 + 10)
    w, b = models.classifier_weight(m)
    self.assertEqual(w.shape, (10, 64))
    np.testing.assert_allclose(np.asarray(feat @ w.T + b),
                               np.asarray(logits), rtol=1e-5, atol=1e-5)

  def test_unknown_model(self):
    with self.assertRaisesRegex(models.ModelError, 'unknown model'):
      models.create_backbone('resnet9000', num_classes=10, input_shape=(8,),
                             rngs=nnx.Rngs(0))

  def test_stage_wrappers(self):
    bb = models.create_backbone('mlp', num_classes=10, input_shape=(64,),
                                rngs=nnx.Rngs(0), hidden=(32, 16))
    s1 = distill.Stage1Model(bb, 64, rngs=nnx.Rngs(1))
    w = jnp.ones((10, 64))
    self.assertEqual(s1(jnp.ones((2, 64)), w, jnp.zeros(10)).shape, (2, 10))
    g = distill.GenDDModel(bb, 64, 16, 32, 2, rngs=nnx.Rngs(1))
    z, probe, feat = g.student(jnp.ones((2, 64)))
    self.assertEqual((z.shape, probe.shape, feat.shape),
                     ((2, 16), (2, 10), (2, 16)))
    self.assertEqual(g.head.num_tokens, 4)


if __name__ == '__main__':
  absltest.main()
