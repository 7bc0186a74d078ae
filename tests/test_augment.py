"""Augmentation tests: decoding, views, RandAugment ops, Mixup/CutMix."""

from __future__ import annotations

import io
import math
import pickle

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image

from gendd_jax.data import augment


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth random uint8 [h, w, 3] image (JPEG-friendly)."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(low).resize((w, h),
                                                Image.Resampling.BICUBIC))


def _noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3),
                                              dtype=np.uint8)


def _encode(img, fmt='JPEG', mode=None, **kwargs) -> bytes:
  im = Image.fromarray(img)
  if mode is not None:
    im = im.convert(mode)
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


class DecodeTest(absltest.TestCase):

  def test_rgb_jpeg(self):
    img = _smooth_image(37, 53)
    out = augment.decode(_encode(img, quality=95))
    self.assertEqual(out.shape, (37, 53, 3))
    self.assertEqual(out.dtype, np.uint8)
    self.assertLess(np.abs(out.astype(int) - img).mean(), 3.0)

  def test_grayscale_and_cmyk_become_rgb(self):
    img = _smooth_image(20, 30)
    gray = augment.decode(_encode(img, mode='L'))
    self.assertEqual(gray.shape, (20, 30, 3))
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    cmyk = augment.decode(_encode(img, mode='CMYK', quality=95))
    self.assertEqual(cmyk.shape, (20, 30, 3))
    self.assertLess(np.abs(cmyk.astype(int) - img).mean(), 6.0)

  def test_png_with_alpha(self):
    img = _noise_image(9, 7)
    rgba = np.concatenate([img, np.full((9, 7, 1), 7, np.uint8)], -1)
    out = augment.decode(_encode(rgba, fmt='PNG'))
    np.testing.assert_array_equal(out, img)

  def test_corrupt_bytes_raise_specific_error(self):
    good = _encode(_smooth_image(64, 64))
    for bad in (b'', b'not an image at all', good[:len(good) // 2],
                b'\xff\xd8\xff' + bytes(200)):
      with self.assertRaises(augment.CorruptImageError):
        augment.decode(bad)
    self.assertTrue(issubclass(augment.CorruptImageError, ValueError))


class CropBoxTest(absltest.TestCase):

  def test_area_and_ratio_within_bounds(self):
    h, w = 375, 500
    rng = _rng(1)
    areas, ratios = [], []
    for _ in range(2000):
      top, left, bh, bw = augment.random_resized_crop_box(
          h, w, rng, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))
      self.assertTrue(0 <= top and top + bh <= h)
      self.assertTrue(0 <= left and left + bw <= w)
      areas.append(bh * bw / (h * w))
      ratios.append(bw / bh)
    # Rounding the sides to pixels moves area and ratio by < 1%.
    self.assertGreaterEqual(min(areas), 0.6 * 0.99)
    self.assertLessEqual(max(areas), 1.0)
    self.assertGreaterEqual(min(ratios), 0.75 * 0.99)
    self.assertLessEqual(max(ratios), 4 / 3 * 1.01)
    self.assertGreater(np.ptp(areas), 0.3)  # The range is really explored.

  def test_fallback_is_centred_clipped_ratio(self):
    # No box of area >= 60% with ratio in [3/4, 4/3] fits: all 10 draws fail.
    self.assertEqual(augment.random_resized_crop_box(10, 1000, _rng()),
                     ((10 - 10) // 2, (1000 - 13) // 2, 10, 13))
    self.assertEqual(augment.random_resized_crop_box(1000, 10, _rng()),
                     ((1000 - 13) // 2, 0, 13, 10))

  def test_full_box_crop_is_plain_resize(self):
    img = _smooth_image(60, 80)
    out = augment.random_resized_crop(img, _rng(), size=32, scale=(1, 1),
                                      ratio=(80 / 60, 80 / 60))
    want = Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(out, np.asarray(want))


class ViewTest(parameterized.TestCase):

  def test_eval_view_without_resize_is_centre_crop(self):
    img = _noise_image(256, 300)
    out = augment.eval_view(img, size=224, resize=256)
    np.testing.assert_array_equal(out, img[16:240, 38:262])

  def test_eval_view_resizes_shorter_side(self):
    img = _smooth_image(300, 400)
    out = augment.eval_view(img, size=224, resize=256)
    # 300 x 400 -> 256 x int(256 * 400 / 300) = 256 x 341, then offsets
    # round(16) = 16 and round(58.5) = 58 (round half to even).
    resized = np.asarray(Image.fromarray(img).resize(
        (341, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, resized[16:240, 58:282])

  def test_eval_view_pads_small_images(self):
    img = _noise_image(20, 30)
    out = augment.eval_view(img, size=32, resize=20)
    self.assertEqual(out.shape, (32, 32, 3))
    np.testing.assert_array_equal(out[6:26, 1:31], img)
    self.assertEqual(int(out[:6].max()), 0)

  def test_flip(self):
    img = _noise_image(5, 7)
    np.testing.assert_array_equal(
        augment.horizontal_flip(img, _rng(), p=1.0), img[:, ::-1])
    np.testing.assert_array_equal(
        augment.horizontal_flip(img, _rng(), p=0.0), img)
    flipped = [not np.array_equal(augment.horizontal_flip(img, _rng(s)), img)
               for s in range(40)]
    self.assertTrue(0 < sum(flipped) < 40)

  def test_pad_crop_flip_is_a_window_of_the_padded_image(self):
    img = _noise_image(32, 32)
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = img
    seen = set()
    for seed in range(30):
      out = augment.pad_crop_flip(img[None], _rng(seed))[0]
      self.assertEqual((out.shape, out.dtype), ((32, 32, 3), np.uint8))
      match = [(dy, dx, f) for dy in range(9) for dx in range(9)
               for f in (0, 1)
               if np.array_equal(out, padded[dy:dy + 32, dx:dx + 32]
                                 [:, ::-1 if f else 1])]
      self.assertLen(match, 1)
      seen.add(match[0])
    self.assertGreater(len(seen), 20)
    self.assertLen({m[2] for m in seen}, 2)

  def test_normalise(self):
    img = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
    out = augment.normalise(img)
    self.assertEqual(out.dtype, np.float32)
    mean = np.array(augment.IMAGENET_MEAN)
    std = np.array(augment.IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (1 - mean) / std, rtol=1e-6)
    self.assertEqual(augment.IMAGENET_FILL, (124, 116, 104))

  def test_normalise_batch_matches_torch(self):
    img = _noise_image(2 * 7, 5).reshape(2, 7, 5, 3)
    out = augment.normalise(img)
    self.assertEqual(out.shape, img.shape)
    mean = np.array(augment.IMAGENET_MEAN, np.float32)
    std = np.array(augment.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(out, (img / 255.0 - mean) / std, rtol=1e-6,
                               atol=1e-6)
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest('torch is not installed: the numpy reference above '
                    'passed; the comparison with torchvision needs torch')
    # torchvision's ToTensor + Normalize: CHW float32 / 255, (x - m) / s.
    t = torch.from_numpy(img).permute(0, 3, 1, 2).float().div(255)
    t = t.sub(torch.tensor(mean)[:, None, None]).div(
        torch.tensor(std)[:, None, None])
    np.testing.assert_array_equal(out, t.permute(0, 2, 3, 1).numpy())


class ColorJitterTest(absltest.TestCase):

  def test_unit_factors_and_zero_strength_are_identity(self):
    img = _noise_image(16, 24)
    ones = [('brightness', 1.0), ('contrast', 1.0), ('saturation', 1.0)]
    np.testing.assert_array_equal(augment.adjust_color(img, ones), img)
    np.testing.assert_array_equal(
        augment.color_jitter(img, _rng(), 0.0, 0.0, 0.0), img)

  def test_params(self):
    orders = set()
    for seed in range(30):
      ops = augment.color_jitter_params(_rng(seed))
      self.assertCountEqual([n for n, _ in ops],
                            ['brightness', 'contrast', 'saturation'])
      for _, f in ops:
        self.assertTrue(0.6 <= f <= 1.4)
      orders.add(tuple(n for n, _ in ops))
    self.assertGreater(len(orders), 3)  # The order is random.
    ops = augment.color_jitter_params(_rng(), 0.4, 0.0, 0.2)
    self.assertCountEqual([n for n, _ in ops], ['brightness', 'saturation'])

  def test_brightness_and_contrast_formulas(self):
    img = _smooth_image(16, 24)
    x = img.astype(np.float64)
    got = augment.adjust_color(img, [('brightness', 0.5)]).astype(int)
    self.assertLessEqual(np.abs(got - x * 0.5).max(), 1.0)
    # Contrast blends with the rounded mean of the (ITU-R 601) gray image.
    gray = np.asarray(Image.fromarray(img).convert('L'), np.float64)
    mean = int(gray.mean() + 0.5)
    got = augment.adjust_color(img, [('contrast', 1.3)]).astype(int)
    want = np.clip(mean + 1.3 * (x - mean), 0, 255)
    self.assertLessEqual(np.abs(got - want).max(), 1.0)


class RandAugmentTest(parameterized.TestCase):

  @parameterized.parameters(*augment.RAND_OPS)
  def test_op_gives_valid_image(self, name):
    img = _smooth_image(48, 40)
    for interpolation in ('bilinear', 'bicubic'):
      out = augment.apply_op(img, name, 7.0, _rng(),
                             interpolation=interpolation)
      self.assertEqual((out.shape, out.dtype), (img.shape, np.uint8))

  @parameterized.parameters('Rotate', 'ShearX', 'ShearY', 'TranslateXRel',
                            'TranslateYRel')
  def test_geometric_ops_at_magnitude_zero_are_identity(self, name):
    img = _noise_image(31, 45)
    for seed in range(4):  # Either sign.
      for interpolation in ('bilinear', 'bicubic'):
        np.testing.assert_array_equal(
            augment.apply_op(img, name, 0.0, _rng(seed),
                             interpolation=interpolation), img)

  def test_exact_point_ops(self):
    img = _noise_image(12, 10)
    np.testing.assert_array_equal(
        augment.apply_op(img, 'Invert', 7.0, _rng()), 255 - img)
    # Posterize at 5: int(0.5 * 4) = 2 bits kept.
    np.testing.assert_array_equal(
        augment.apply_op(img, 'Posterize', 5.0, _rng()), img & 0xC0)
    # Posterize below 2.5 keeps 0 bits: black (as timm with old Pillow).
    np.testing.assert_array_equal(
        augment.apply_op(img, 'Posterize', 2.0, _rng()), 0 * img)
    # Solarize at 5: pixels >= int(0.5 * 256) = 128 inverted.
    np.testing.assert_array_equal(
        augment.apply_op(img, 'Solarize', 5.0, _rng()),
        np.where(img >= 128, 255 - img, img))
    # SolarizeAdd at 5: int(0.5 * 110) = 55 added below 128, clipped.
    np.testing.assert_array_equal(
        augment.apply_op(img, 'SolarizeAdd', 5.0, _rng()),
        np.where(img < 128, np.minimum(img.astype(int) + 55, 255), img))

  def test_translate_shifts_by_fraction_and_fills(self):
    img = _noise_image(20, 100)
    fill = np.array(augment.IMAGENET_FILL, np.uint8)
    for seed in range(6):
      out = augment.apply_op(img, 'TranslateXRel', 10.0, _rng(seed))
      # 45% of 100 pixels, either direction.
      left = (np.array_equal(out[:, :55], img[:, 45:])
              and (out[:, 55:] == fill).all())
      right = (np.array_equal(out[:, 45:], img[:, :55])
               and (out[:, :45] == fill).all())
      self.assertTrue(left or right)

  def test_rotate_fills_corners(self):
    img = _noise_image(64, 64)
    out = augment.apply_op(img, 'Rotate', 10.0, _rng())  # 30 degrees.
    np.testing.assert_array_equal(out[0, 0], augment.IMAGENET_FILL)
    np.testing.assert_array_equal(out[-1, -1], augment.IMAGENET_FILL)

  def test_unknown_op(self):
    with self.assertRaisesRegex(ValueError, 'TranslateYRel'):
      augment.apply_op(_noise_image(4, 4), 'Cutout', 5.0, _rng())

  def test_rand_augment(self):
    img = _smooth_image(40, 48)
    a = augment.rand_augment(img, _rng(3))
    np.testing.assert_array_equal(a, augment.rand_augment(img, _rng(3)))
    self.assertEqual((a.shape, a.dtype), (img.shape, np.uint8))
    outs = [augment.rand_augment(img, _rng(s)) for s in range(12)]
    self.assertGreater(len({o.tobytes() for o in outs}), 6)
    np.testing.assert_array_equal(
        augment.rand_augment(img, _rng(), prob=0.0), img)


class TransformTest(parameterized.TestCase):

  @parameterized.parameters('none', 'regular', 'rand', 'cifar')
  def test_shapes_ranges_and_determinism(self, kind):
    size = 32 if kind == 'cifar' else 64
    img = _smooth_image(32, 32) if kind == 'cifar' else _smooth_image(75, 100)
    fn = augment.train_transform(kind, size)
    a = fn(img, _rng(7))
    self.assertEqual((a.shape, a.dtype), ((size, size, 3), np.float32))
    np.testing.assert_array_equal(a, fn(img, _rng(7)))
    outs = {fn(img, _rng(s)).tobytes() for s in range(8)}
    self.assertLen(outs, 1 if kind == 'none' else len(outs))
    if kind != 'none':
      self.assertGreater(len(outs), 4)
    mean, std = augment._stats(kind, None, None)
    lo = (0 - np.array(mean)) / np.array(std)
    hi = (1 - np.array(mean)) / np.array(std)
    self.assertTrue(((a >= lo - 1e-5) & (a <= hi + 1e-5)).all())
    raw = augment.train_transform(kind, size, as_uint8=True)(img, _rng(7))
    self.assertEqual(raw.dtype, np.uint8)
    np.testing.assert_allclose(augment.normalise(raw, mean, std), a,
                               rtol=1e-6, atol=1e-6)

  @parameterized.parameters('none', 'regular', 'rand', 'cifar')
  def test_eval_transform(self, kind):
    size = 32 if kind == 'cifar' else 56
    img = _smooth_image(50, 70)
    fn = augment.eval_transform(kind, size)
    out = fn(img, _rng(0))
    self.assertEqual((out.shape, out.dtype), ((size, size, 3), np.float32))
    np.testing.assert_array_equal(out, fn(img, _rng(1)))

  def test_defaults(self):
    self.assertEqual(augment.default_eval_resize('regular', 224), 256)
    self.assertEqual(augment.default_eval_resize('cifar', 32), 32)
    img = _noise_image(32, 32)
    mean, std = augment._stats('cifar', None, None)
    np.testing.assert_allclose(
        augment.eval_transform('cifar', 32)(img),
        augment.normalise(img, mean, std), rtol=1e-6)
    # CIFAR training on 32 x 32 is pad-crop-flip then normalise.
    np.testing.assert_array_equal(
        augment.train_transform('cifar', 32, as_uint8=True)(img, _rng(5)),
        augment.pad_crop_flip(img[None], _rng(5))[0])

  def test_odd_sizes_like_tfds_mock_data(self):
    for h, w in ((47, 17), (1, 1), (3, 200), (300, 2)):
      img = _noise_image(h, w)
      for kind in augment.KINDS:
        size = 32 if kind == 'cifar' else 24
        for fn in (augment.train_transform(kind, size),
                   augment.eval_transform(kind, size)):
          self.assertEqual(fn(img, _rng()).shape, (size, size, 3))

  def test_accepts_pil_images(self):
    img = _smooth_image(50, 70)
    fn = augment.train_transform('rand', 32)
    np.testing.assert_array_equal(fn(Image.fromarray(img), _rng(3)),
                                  fn(img, _rng(3)))

  def test_views_pickle(self):
    img = _smooth_image(50, 70)
    for fn in (augment.train_transform('rand', 32),
               augment.train_transform('cifar', 32),
               augment.eval_transform('regular', 32)):
      clone = pickle.loads(pickle.dumps(fn))
      self.assertEqual(clone, fn)
      np.testing.assert_array_equal(clone(img, _rng(2)), fn(img, _rng(2)))

  def test_unknown_kind(self):
    for make in (augment.train_transform, augment.eval_transform):
      with self.assertRaisesRegex(ValueError, 'none, regular, rand, cifar'):
        make('autoaug', 224)


class MixTest(parameterized.TestCase):

  def _batch(self, b=6, n=10, hw=(8, 12)):
    rng = _rng(0)
    images = rng.normal(size=(b,) + hw + (3,)).astype(np.float32)
    labels = np.arange(b) % n  # Partners i, b-1-i have distinct labels.
    return images, labels

  def test_no_mixing_no_smoothing_is_one_hot(self):
    images, labels = self._batch()
    out, soft = augment.mix_batch(images, labels, 10, _rng(), 0.0, 0.0,
                                  label_smoothing=0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(soft, np.eye(10, dtype=np.float32)[labels])

  def test_label_smoothing_only(self):
    images, labels = self._batch()
    _, soft = augment.mix_batch(images, labels, 10, _rng(), 0.0, 0.0,
                                label_smoothing=0.1)
    self.assertEqual(soft.dtype, np.float32)
    np.testing.assert_allclose(soft[np.arange(6), labels], 0.9 + 0.01)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    self.assertAlmostEqual(float(soft[0, 5]), 0.01)

  @parameterized.parameters((0.2, 1.0, 0.1), (0.1, 0.0, 0.0),
                            (0.0, 1.0, 0.1), (0.2, 1.0, 0.0))
  def test_rows_sum_to_one(self, mixup, cutmix, smoothing):
    images, labels = self._batch()
    for seed in range(10):
      _, soft = augment.mix_batch(images, labels, 10, _rng(seed), mixup,
                                  cutmix, label_smoothing=smoothing)
      np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
      self.assertTrue((soft >= 0).all())

  def test_mixup_blends_with_reversed_batch(self):
    images, labels = self._batch()
    before = images.copy()
    out, soft = augment.mix_batch(images, labels, 10, _rng(2), 0.2, 0.0,
                                  label_smoothing=0.0)
    np.testing.assert_array_equal(images, before)  # Input untouched.
    lam = soft[0, labels[0]]
    self.assertTrue(0.0 < lam < 1.0)
    np.testing.assert_allclose(soft[0, labels[-1]], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1],
                               rtol=1e-5, atol=1e-6)

  def test_cutmix_pastes_one_rectangle_and_lambda_is_kept_area(self):
    images, labels = self._batch(b=4, hw=(16, 20))
    hit = 0
    for seed in range(20):
      out, soft = augment.mix_batch(images, labels, 10, _rng(seed), 0.0, 1.0,
                                    label_smoothing=0.0)
      changed = (out != images).any(-1)  # [B, H, W]
      np.testing.assert_array_equal(changed[0], changed[1])  # One box.
      if not changed.any():
        np.testing.assert_allclose(soft[0, labels[0]], 1.0)
        continue
      hit += 1
      ys, xs = np.nonzero(changed[0])
      t, b, lo, hi = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
      self.assertEqual(changed[0].sum(), (b - t) * (hi - lo))  # Rectangle.
      np.testing.assert_array_equal(out[:, t:b, lo:hi],
                                    images[::-1, t:b, lo:hi])
      kept = 1.0 - (b - t) * (hi - lo) / (16 * 20)
      for i in range(4):
        np.testing.assert_allclose(soft[i, labels[i]], kept, rtol=1e-6)
        np.testing.assert_allclose(soft[i, labels[3 - i]], 1 - kept,
                                   rtol=1e-5)
    self.assertGreater(hit, 10)

  def test_cutmix_box(self):
    for seed in range(50):
      (t, b, lo, hi), lam = augment.cutmix_box(16, 20, 0.3, _rng(seed))
      self.assertTrue(0 <= t <= b <= 16 and 0 <= lo <= hi <= 20)
      self.assertAlmostEqual(lam, 1 - (b - t) * (hi - lo) / 320)
      # Unclipped the box is int(side * sqrt(0.7)) rounded down to even.
      self.assertLessEqual(b - t, 2 * (int(16 * math.sqrt(0.7)) // 2))

  def test_switch_and_prob(self):
    images, labels = self._batch()

    def is_cutmix(out):
      return bool(((out == images).all(-1) | (out == images[::-1]).all(-1))
                  .all())
    for seed in range(5):
      out, _ = augment.mix_batch(images, labels, 10, _rng(seed), 0.2, 1.0,
                                 switch_prob=1.0)
      self.assertTrue(is_cutmix(out))
      out, _ = augment.mix_batch(images, labels, 10, _rng(seed), 0.2, 1.0,
                                 switch_prob=0.0)
      self.assertFalse(is_cutmix(out))
      out, soft = augment.mix_batch(images, labels, 10, _rng(seed), 0.2,
                                    1.0, prob=0.0, label_smoothing=0.0)
      np.testing.assert_array_equal(out, images)
      np.testing.assert_array_equal(soft.max(1), 1.0)

  def test_deterministic_under_seed(self):
    images, labels = self._batch()
    a = augment.mix_batch(images, labels, 10, _rng(4), 0.2, 1.0)
    b = augment.mix_batch(images, labels, 10, _rng(4), 0.2, 1.0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])

  def test_bad_arguments(self):
    images, labels = self._batch()
    with self.assertRaisesRegex(ValueError, r'\[0, 10\)'):
      augment.mix_batch(images, labels + 5, 10, _rng(), 0.2, 1.0)
    with self.assertRaisesRegex(ValueError, 'alphas'):
      augment.mix_batch(images, labels, 10, _rng(), -1.0, 1.0)
    with self.assertRaisesRegex(ValueError, 'labels'):
      augment.mix_batch(images, labels[:3], 10, _rng(), 0.2, 1.0)


if __name__ == '__main__':
  absltest.main()
