"""The CIFAR-100 model zoo: parameter counts, state-dict keys, shapes,
conversion parity with torch twins, BatchNorm modes, conversion errors.

Full-size models are only built abstractly (`nnx.eval_shape`). Parity
models are built abstractly too and filled from the torch state dict, and
their forward pass is jitted once (`tests/torch_ref/parity.py`).
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from gendd_jax.models import torch_import
from gendd_jax import models
from gendd_jax.models import cifar
from tests.torch_ref import cifar as torch_cifar
from tests.torch_ref import parity

# Trainable parameters with 100 classes, counted on the reference's own
# model definitions (/tmp/ref/GenDD_cifar/models, `model_dict[name](
# num_classes=100)`, sum of `p.numel()` over `parameters()`), and the
# feature (classifier input) width.
EXPECTED = {
    'resnet8': (83_892, 64),
    'resnet14': (181_108, 64),
    'resnet20': (278_324, 64),
    'resnet32': (472_756, 64),
    'resnet44': (667_188, 64),
    'resnet56': (861_620, 64),
    'resnet110': (1_736_564, 64),
    'resnet8x4': (1_233_540, 256),
    'resnet32x4': (7_433_860, 256),
    'cifar_resnet50': (23_705_252, 2048),
    'wrn_16_1': (180_916, 64),
    'wrn_16_2': (703_284, 128),
    'wrn_40_1': (569_780, 64),
    'wrn_40_2': (2_255_156, 128),
    'vgg8': (3_965_028, 512),
    'vgg11': (9_277_284, 512),
    'vgg13': (9_462_180, 512),
    'vgg16': (14_774_436, 512),
    'vgg19': (20_086_692, 512),
    'mobilenetv2': (812_836, 1280),
    'shufflev1': (949_258, 960),
    'shufflev2': (1_355_528, 1024),
}

# One model per family for the numerical comparison.
PARITY = ('resnet8', 'cifar_resnet50', 'wrn_16_1', 'vgg8', 'mobilenetv2',
          'shufflev1', 'shufflev2')


_SHAPE = (32, 32, 3)


def _abstract(name, num_classes=100):
  return parity.abstract(name, num_classes, _SHAPE)


def _torch_shape(path, shape):
  """NNX leaf shape -> the torch tensor shape it converts to."""
  if path[-1] == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _images(n, size=32, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (n, size, size, 3)).astype(np.float32)


class RegistryTest(parameterized.TestCase):

  def test_every_model_is_registered(self):
    self.assertSameElements(cifar.MODELS, EXPECTED)
    for name in EXPECTED:
      self.assertIn(name, models.REGISTRY)
      self.assertEqual(models.REGISTRY[name].default_image_size, 32)

  @parameterized.named_parameters(*[(n, n) for n in EXPECTED])
  def test_count_keys_and_shapes(self, name):
    params, feature_dim = EXPECTED[name]
    model = _abstract(name)
    self.assertEqual(models.param_count(model), params)
    self.assertEqual(model.feature_dim, feature_dim)
    # Same state-dict keys and tensor shapes as the torch twin.
    shapes = {}
    for sub in nnx.state(model, nnx.Param, nnx.BatchStat):
      shapes.update((path, v.shape) for path, v in nnx.to_flat_state(sub))
    ours = {key: _torch_shape(path, shapes[path])
            for key, path in torch_import.model_key_map(model).items()}
    with torch.device('meta'):  # Shapes only, no weights.
      torch_state = torch_cifar.MODELS[name](100).state_dict()
    theirs = {k: tuple(v.shape) for k, v in torch_state.items()
              if not k.endswith('num_batches_tracked')}
    self.assertEqual(ours, theirs)
    graphdef, state = nnx.split(model)
    feat, logits = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state,
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    self.assertEqual(feat.shape, (2, feature_dim))
    self.assertEqual(logits.shape, (2, 100))


class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(n, n) for n in PARITY])
  def test_logits_and_features_match_torch(self, name):
    torch.manual_seed(0)
    gap, scale, feat_gap, feat_scale = parity.logit_gap(
        name, torch_cifar.MODELS[name](10), 10, _images(2), seed=1,
        features=True)
    self.assertGreater(scale, 0.01)
    self.assertLess(gap, 1e-4 * scale, f'gap {gap}, scale {scale}')
    self.assertLess(feat_gap, 1e-4 * feat_scale,
                    f'gap {feat_gap}, scale {feat_scale}')

  def test_vgg_pools_after_block3_only_at_64_pixels(self):
    torch.manual_seed(0)
    gap, scale = parity.logit_gap('vgg8', torch_cifar.MODELS['vgg8'](10), 10,
                                  _images(1, size=64), seed=1)
    self.assertLess(gap, 1e-4 * scale, f'gap {gap}, scale {scale}')


class BatchNormTest(absltest.TestCase):

  def test_train_uses_and_updates_batch_statistics_like_torch(self):
    torch.manual_seed(0)
    torch_model = torch_cifar.MODELS['resnet8'](10)
    parity.randomise_batch_stats(torch_model, seed=1)
    model = parity.converted('resnet8', torch_model, 10, _SHAPE)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    x = _images(4, seed=2)

    parity.forward(model, x, train=False)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(
        nnx.state(model, nnx.BatchStat))):
      np.testing.assert_array_equal(a, np.asarray(b))

    _, logits = parity.forward(model, x, train=True)
    torch_model.train()
    want = parity.torch_forward(torch_model, x)
    np.testing.assert_allclose(logits, want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    after = nnx.state(model, nnx.BatchStat)
    changed = [not np.allclose(a, np.asarray(b)) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(after))]
    self.assertTrue(all(changed))
    # Running means follow torch's momentum-0.1 update. (Running variances
    # differ by n/(n-1): torch stores the unbiased batch variance.)
    np.testing.assert_allclose(
        np.asarray(model.layer3[0].bn2.mean[...]),
        torch_model.layer3[0].bn2.running_mean.numpy(), rtol=1e-4,
        atol=1e-5)


class ConversionTest(absltest.TestCase):

  def test_reference_checkpoint_layout_loads(self):
    torch_model = torch_cifar.MODELS['resnet8x4'](100)
    checkpoint = {'epoch': 240, 'model': torch_model.state_dict(),
                  'best_acc': 70.0}
    model = parity.converted('resnet8x4', checkpoint, 100, _SHAPE)
    np.testing.assert_array_equal(
        np.asarray(model.layer2[0].shortcut_0.kernel[...]),
        torch_model.layer2[0].downsample[0].weight.detach().numpy()
        .transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        np.asarray(model.fc.kernel[...]),
        torch_model.fc.weight.detach().numpy().T)

  def test_wrong_depth_names_missing_key(self):
    state = torch_import.unwrap_state_dict(
        torch_cifar.MODELS['resnet8x4'](100).state_dict())
    with self.assertRaisesRegex(torch_import.ConversionError,
                                r"missing keys .*'layer1\.1\."):
      torch_import.load_state_dict(_abstract('resnet32x4'), state)

  def test_missing_shortcut_is_named(self):
    state = torch_import.unwrap_state_dict(
        torch_cifar.MODELS['resnet8'](100).state_dict())
    with self.assertRaisesRegex(torch_import.ConversionError,
                                r"missing keys .*'layer1\.0\.downsample"):
      torch_import.load_state_dict(_abstract('resnet8x4'), state)

  def test_wrong_class_count_names_classifier(self):
    state = torch_import.unwrap_state_dict(
        torch_cifar.MODELS['wrn_16_1'](100).state_dict())
    with self.assertRaisesRegex(torch_import.ConversionError,
                                r"shape mismatch for .*'fc\.weight'"):
      torch_import.load_state_dict(_abstract('wrn_16_1', num_classes=10), state)


if __name__ == '__main__':
  absltest.main()
