"""ImageNet convnets: ResNet/ResNeXt and MobileNetV1 against torch twins.

The torch twins (`tests/torch_ref/imagenet.py`) carry torchvision's and
mdistiller's state-dict names, so a passing parity test also checks that a
real checkpoint's keys and shapes load. Parity runs on small images (the
networks work at any size from 32 up); full-size models are only built
abstractly, for their parameter counts.
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import numpy as np
import torch

from gendd_jax.models import torch_import
from gendd_jax import models
from gendd_jax.models import resnet
from tests.torch_ref import imagenet as ref
from tests.torch_ref import parity


def _image(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(
      size=(batch, size, size, 3)).astype(np.float32)


def _abstract(name: str) -> nnx.Module:
  return parity.abstract(name, 1000, (224, 224, 3))


class ParameterCountTest(parameterized.TestCase):

  # Upstream counts for 1000 classes: torchvision (resnext50_32x4d,
  # resnext101_32x8d), timm (resnext101_32x4d) and the mdistiller /
  # ReviewKD MobileNetV1, each counted from the built torch module.
  @parameterized.parameters(('resnext50_32x4d', 25_028_904),
                            ('resnext101_32x4d', 44_177_704),
                            ('resnext101_32x8d', 88_791_336),
                            ('mobilenet_v1', 4_231_976))
  def test_equals_upstream(self, name, expected):
    self.assertEqual(models.param_count(_abstract(name)), expected)

  def test_feature_dims(self):
    self.assertEqual(_abstract('resnext101_32x4d').feature_dim, 2048)
    self.assertEqual(_abstract('mobilenet_v1').feature_dim, 1024)

  def test_resnext_first_stage_is_32_groups_of_4(self):
    conv2 = _abstract('resnext101_32x4d').layer1[0].conv2
    # NNX grouped kernels are [kh, kw, in / groups, out].
    self.assertEqual(conv2.kernel.shape, (3, 3, 4, 128))
    self.assertEqual(conv2.feature_group_count, 32)

  def test_mobilenet_key_names(self):
    keys = set(torch_import.model_key_map(_abstract('mobilenet_v1')))
    torch_keys = {k for k in ref.MobileNetV1().state_dict()
                  if not k.endswith('num_batches_tracked')}
    self.assertEqual(keys, torch_keys)
    self.assertIn('model.13.3.weight', keys)

  def test_basic_blocks_take_no_groups(self):
    with self.assertRaisesRegex(ValueError, 'basic blocks'):
      resnet.ResNet(18, 10, groups=32, width_per_group=4, rngs=nnx.Rngs(0))


class ParityTest(parameterized.TestCase):

  def _check(self, arch, torch_model, image):
    gap, scale = parity.logit_gap(arch, torch_model, 10, image)
    self.assertGreater(scale, 0.01)
    self.assertLess(gap, 1e-4 * scale, f'{arch}: gap {gap}, scale {scale}')

  @parameterized.named_parameters(
      ('resnet18', 'resnet18', 18, 1, 64, 2),
      ('resnet50', 'resnet50', 50, 1, 64, 1),
      ('resnext50_32x4d', 'resnext50_32x4d', 50, 32, 4, 1))
  def test_resnet(self, arch, depth, groups, width_per_group, batch):
    torch.manual_seed(0)
    self._check(arch, ref.ResNet(depth, 10, groups, width_per_group),
                _image(batch, 64))

  def test_mobilenet_v1_at_224_with_fixed_pool(self):
    torch.manual_seed(0)
    self._check('mobilenet_v1', ref.MobileNetV1(10, pool=7), _image(1, 224))

  def test_mobilenet_feature_is_classifier_input(self):
    torch.manual_seed(0)
    net = ref.MobileNetV1(10)
    parity.randomise_batch_stats(net)
    m = parity.converted('mobilenet_v1', net, 10, (224, 224, 3))
    feat, logits = parity.forward(m, _image(1, 224))
    self.assertEqual((feat.shape, logits.shape), ((1, 1024), (1, 10)))
    w, b = models.classifier_weight(m)
    np.testing.assert_allclose(feat @ np.asarray(w).T + np.asarray(b),
                               logits, rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
