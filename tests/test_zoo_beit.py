"""BEiT-v2 teachers: parameter counts, relative positions, torch parity.

The torch twin (`tests/torch_ref/beit.py`) carries timm's state-dict names
(and unilm's `relative_position_index` buffers), so a passing parity test
also checks that a real checkpoint's keys and shapes load. Parity runs on a
narrow, shallow variant built through the registry; the full-size models are
only built abstractly, for their parameter counts and key lists.
"""

from __future__ import annotations

import functools
import itertools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import numpy as np
import torch

from gendd_jax.models import torch_import
from gendd_jax import models
from gendd_jax.models import beit
from tests.torch_ref import beit as ref
from tests.torch_ref import parity

_ARCH = 'beitv2_base_patch16_224'
_TINY = dict(embed_dim=64, depth=2, num_heads=4)


def _image(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(
      size=(batch, height, width, 3)).astype(np.float32)


def _abstract(name: str) -> nnx.Module:
  return parity.abstract(name, 1000, (224, 224, 3))


def _tiny_torch(num_classes: int, image_size: tuple) -> ref.BeitV2:
  torch.manual_seed(0)
  net = ref.BeitV2(num_classes, image_size, embed_dim=64, depth=2, heads=4)
  ref.randomise(net)
  return net.eval()


class ParameterCountTest(parameterized.TestCase):

  # Upstream counts for 1000 classes, from timm 1.0.31's
  # `create_model(name, pretrained=False)`.
  @parameterized.parameters(('beitv2_base_patch16_224', 86_530_984, 768),
                            ('beitv2_large_patch16_224', 304_430_568, 1024))
  def test_equals_upstream(self, name, expected, dim):
    model = _abstract(name)
    self.assertEqual(models.param_count(model), expected)
    self.assertEqual(model.feature_dim, dim)

  @parameterized.parameters(('beitv2_base_patch16_224', 768, 12, 12),
                            ('beitv2_large_patch16_224', 1024, 24, 16))
  def test_keys_and_shapes_equal_torch_layout(self, name, dim, depth, heads):
    with torch.device('meta'):
      net = ref.BeitV2(1000, (224, 224), dim, depth, heads)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith('relative_position_index')}
    model = _abstract(name)
    got = {}
    for key, path in torch_import.model_key_map(model).items():
      shape = tuple(functools.reduce(
          lambda v, p: v[p] if isinstance(p, int) else getattr(v, p), path,
          model).shape)
      if len(shape) == 2 and key.endswith('weight'):  # Linear [in, out].
        shape = shape[::-1]
      elif len(shape) == 4:  # Conv HWIO -> OIHW.
        shape = (shape[3], shape[2], shape[0], shape[1])
      got[key] = shape
    self.assertEqual(got, want)
    self.assertEqual(want['blocks.0.attn.relative_position_bias_table'],
                     (27 * 27 + 3, heads))


class RelativePositionTest(parameterized.TestCase):

  @staticmethod
  def _brute_force(gh, gw):
    """Distinct (dh, dw) offsets numbered row-major, then the cls rows."""
    offsets = list(itertools.product(range(-(gh - 1), gh),
                                     range(-(gw - 1), gw)))
    row = {o: i for i, o in enumerate(offsets)}
    cells = list(itertools.product(range(gh), range(gw)))
    n = len(cells)
    out = np.zeros((n + 1, n + 1), np.int64)
    for i, (qh, qw) in enumerate(cells):
      for j, (kh, kw) in enumerate(cells):
        out[i + 1, j + 1] = row[(qh - kh, qw - kw)]
    out[0, 1:] = len(offsets)  # cls -> token
    out[1:, 0] = len(offsets) + 1  # token -> cls
    out[0, 0] = len(offsets) + 2  # cls -> cls
    return out

  @parameterized.parameters((1, 1), (2, 2), (2, 3), (4, 3))
  def test_matches_independent_constructions(self, gh, gw):
    got = beit.relative_position_index((gh, gw))
    want = self._brute_force(gh, gw)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        got, ref.relative_position_index(gh, gw).numpy())
    # Every table row is used.
    self.assertEqual(np.unique(got).size,
                     beit.num_relative_distances((gh, gw)))

  def test_bias_follows_the_table(self):
    attn = torch_import.empty_model(
        lambda: beit.Attention(16, 4, (3, 2), rngs=nnx.Rngs(0)))
    table = np.arange(attn.relative_position_bias_table.size,
                      dtype=np.float32).reshape(-1, 4)
    attn.relative_position_bias_table[...] = table
    bias = np.asarray(attn.position_bias())
    self.assertEqual(bias.shape, (4, 7, 7))
    index = self._brute_force(3, 2)
    np.testing.assert_array_equal(bias[2], table[index, 2])


class BeitTest(parameterized.TestCase):

  def test_tiny_forward_shapes_and_feature(self):
    model = parity.converted(_ARCH, _tiny_torch(10, (64, 64)), 10,
                             (64, 64, 3), **_TINY)
    self.assertLen(model.blocks, 2)
    self.assertEqual(model.grid, (4, 4))
    feat, logits = parity.forward(model, _image(2, 64, 64))
    self.assertEqual((feat.shape, logits.shape), ((2, 64), (2, 10)))
    self.assertEqual(model.feature_dim, 64)
    w, b = models.classifier_weight(model)
    np.testing.assert_allclose(feat @ np.asarray(w).T + np.asarray(b),
                               logits, rtol=1e-5, atol=1e-5)

  def test_parity_with_torch(self):
    # A non-square grid (4 x 3 patches) catches a transposed position index.
    net = _tiny_torch(10, (64, 48))
    gap, scale = parity.logit_gap(_ARCH, net, 10, _image(2, 64, 48), **_TINY)
    self.assertGreater(scale, 0.1)
    self.assertLess(gap, 1e-4 * scale, f'gap {gap}, scale {scale}')

  def test_unilm_checkpoint_loads_and_exports_back(self):
    checkpoint = {'model': _tiny_torch(10, (64, 48)).state_dict()}
    # Unilm checkpoints hold the index buffers; they must be skipped.
    state = torch_import.unwrap_state_dict(checkpoint)
    self.assertIn('blocks.0.attn.relative_position_index', state)
    model = parity.converted(_ARCH, checkpoint, 10, (64, 48, 3), **_TINY)
    exported = torch_import.export_state_dict(model)
    self.assertEqual(set(exported), {
        k for k in state if not k.endswith('relative_position_index')})
    for key, value in exported.items():
      np.testing.assert_array_equal(value, state[key], err_msg=key)

  def test_remat_gives_same_values(self):
    image = _image(1, 32, 32)
    # The model's own initial weights (not converted ones): the tolerances
    # below hold for their scale.
    plain = parity.initialised(_ARCH, 3, image.shape[1:], **_TINY)
    rematted = nnx.clone(plain)
    rematted.remat = True

    @nnx.jit
    def loss_and_grad(m, x):
      loss, grads = nnx.value_and_grad(lambda m_: (m_(x)[1] ** 2).sum())(m)
      return loss, grads['blocks'][0]['attn']['qkv']['kernel'][...]

    l1, g1 = loss_and_grad(plain, image)
    l2, g2 = loss_and_grad(rematted, image)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), rtol=1e-6)
    self.assertGreater(float(np.abs(g1).max()), 0.0)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-5,
                               atol=1e-9)


class ErrorTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.state = torch_import.unwrap_state_dict(
        _tiny_torch(10, (32, 32)).state_dict())

  def test_other_grid_is_a_shape_mismatch(self):
    # 3 x 2 patches, the state has 2 x 2.
    model = parity.empty(_ARCH, 10, (48, 32, 3), **_TINY)
    with self.assertRaisesRegex(
        torch_import.ConversionError,
        r'shape mismatch for .blocks\.0\.attn\.relative_position_bias_table'):
      torch_import.load_state_dict(model, self.state)

  def test_missing_and_unexpected_keys(self):
    model = parity.empty(_ARCH, 10, (32, 32, 3), **_TINY)
    state = dict(self.state)
    del state['blocks.1.gamma_2']
    state['rel_pos_bias.relative_position_bias_table'] = np.zeros((12, 4))
    with self.assertRaisesRegex(
        torch_import.ConversionError,
        r"unexpected keys \['rel_pos_bias.*missing keys \['blocks.1.gamma_2"):
      torch_import.load_state_dict(model, state)

  def test_wrong_input_size_and_settings(self):
    model = parity.empty(_ARCH, 10, (32, 32, 3), **_TINY)
    with self.assertRaisesRegex(ValueError, 'patch grid'):
      model(_image(1, 48, 48))
    with self.assertRaisesRegex(models.ModelError, 'not divisible'):
      parity.empty(_ARCH, 10, (32, 32, 3), embed_dim=66, depth=1,
                   num_heads=4)
    with self.assertRaisesRegex(models.ModelError, 'smaller than one'):
      parity.empty(_ARCH, 10, (8, 8, 3), **_TINY)


if __name__ == '__main__':
  absltest.main()
