"""Image decoding, the training and evaluation views, normalisation statistics
(ImageNet, CIFAR) and batch mixing, on the host.

Everything here is numpy + Pillow and runs in the input pipeline's worker
processes. Every random choice is drawn from an explicit
`np.random.Generator` (grain's `RandomMap` passes one per example), so a seed
reproduces the stream exactly.

The views follow the reference's PyTorch scripts (torchvision on PIL images,
and the timm-derived `randaugment.py` the ImageNet scripts import):

* `regular`: `RandomResizedCrop(224, scale=(0.6, 1))` (bilinear) and a
  horizontal flip with probability 0.5.
* `rand`: `regular`, then `ColorJitter(0.4, 0.4, 0.4)` and
  `RandAugment('rand-n2-m7-mstd0.5')` with the ImageNet mean as fill colour.
  The reference applies both, in that order.
* evaluation: shorter side resized to 256 (bilinear), centre crop 224.
* `cifar`: zero-pad by 4 (on uint8, before normalisation), random 32 x 32 crop,
  horizontal flip.
* normalisation by the ImageNet (or CIFAR) mean and standard deviation.

`mix_batch` is timm's `Mixup` in 'batch' mode (one lambda per batch, partner
= the batch reversed) with label smoothing, giving soft labels `[B, N]`.

Colour operations use Pillow's `ImageEnhance`/`ImageOps` as torchvision and
timm do on PIL images, so for the same random parameters the pixels match
the reference's.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
from gendd_jax.errors import CorruptImageError

# ImageNet statistics (torchvision's `Normalize` in the reference scripts).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandAugment's fill colour: the ImageNet mean in uint8, as the reference's
# `img_mean=tuple(min(255, round(255 * x)) for x in rgb_mean)`.
IMAGENET_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)
# Per-channel CIFAR statistics (as the reference scripts).
CIFAR_MEAN = {'cifar10': (0.4914, 0.4822, 0.4465),
              'cifar100': (0.5071, 0.4867, 0.4408)}
CIFAR_STD = {'cifar10': (0.2470, 0.2435, 0.2616),
             'cifar100': (0.2675, 0.2565, 0.2761)}

# Transform kinds accepted by `train_transform` / `eval_transform`.
KINDS = ('none', 'regular', 'rand', 'cifar')

# timm's RandAugment op list (`_RAND_TRANSFORMS`; 'Posterize' is the TPU
# variant the reference calls 'PosterizeTpu': keep 0..4 bits).
RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
            'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness',
            'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
MAX_LEVEL = 10.0  # RandAugment magnitudes live in [0, MAX_LEVEL].
# The reference's RandAugment hparams name no interpolation, so timm picks
# one of these at random for every geometric op.
RAND_INTERPOLATION = ('bilinear', 'bicubic')

_RESAMPLE = {'nearest': Image.Resampling.NEAREST,
             'bilinear': Image.Resampling.BILINEAR,
             'bicubic': Image.Resampling.BICUBIC}

# (top, left, height, width) of a crop.
Box = tuple[int, int, int, int]
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------- decoding


def decode(data: bytes) -> np.ndarray:
  """Encoded image (JPEG, PNG, ...) -> uint8 `[H, W, 3]` RGB.

  Grayscale, palette, CMYK and alpha images are converted to RGB (alpha is
  dropped), as `PIL.Image.convert('RGB')` in the reference's loaders. The
  array is read-only (it wraps Pillow's buffer; copy before writing).

  Raises:
    CorruptImageError: the bytes are not a decodable image (also truncated
      files: Pillow's `LOAD_TRUNCATED_IMAGES` is left off).
  """
  return np.asarray(_decode_pil(data))


def _decode_pil(data: bytes) -> Image.Image:
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # The full decode, inside the `try`.
      return im if im.mode == 'RGB' else im.convert('RGB')
  except (OSError, SyntaxError, ValueError, EOFError,
          Image.DecompressionBombError) as e:
    raise CorruptImageError(
        f'cannot decode image ({len(data)} bytes): {type(e).__name__}: '
        f'{e}') from e


def _to_pil(img: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(img, Image.Image):
    return img if img.mode == 'RGB' else img.convert('RGB')
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f'expected a uint8 [H, W, 3] image, got {img.dtype} '
                     f'{img.shape}')
  return Image.fromarray(img)


def _resample(name: str) -> Image.Resampling:
  try:
    return _RESAMPLE[name]
  except KeyError:
    raise ValueError(f'unknown interpolation {name!r}; choose from '
                     f'{", ".join(_RESAMPLE)}') from None


# --------------------------------------------------------- geometric views


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.6, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> Box:
  """torchvision's `RandomResizedCrop` box: `(top, left, h, w)`.

  Up to 10 draws of an area fraction `U[scale]` and a log-uniform aspect
  ratio `w / h` in `ratio`; the first whose rounded box fits is placed
  uniformly. Otherwise the largest centred box with the aspect ratio clipped
  to `ratio` (the whole image when its ratio is inside).
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resized_crop(im: Image.Image, box: Box, size: int,
                  resample: Image.Resampling) -> Image.Image:
  top, left, h, w = box
  # Crop, then resize (not `resize(box=...)`, whose filter would also read
  # pixels outside the box): torchvision's `resized_crop` on PIL images.
  return im.crop((left, top, left + w, top + h)).resize((size, size),
                                                        resample)


def random_resized_crop(img: np.ndarray, rng: np.random.Generator,
                        size: int = 224,
                        scale: tuple[float, float] = (0.6, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str = 'bilinear') -> np.ndarray:
  """uint8 `[H, W, 3]` -> a random crop resized to uint8 `[size, size, 3]`."""
  box = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
  return np.asarray(_resized_crop(_to_pil(img), box, size,
                                  _resample(interpolation)))


def horizontal_flip(img: np.ndarray, rng: np.random.Generator,
                    p: float = 0.5) -> np.ndarray:
  """Mirrors `[H, W, C]` left-right with probability `p`."""
  if rng.random() < p:
    return np.ascontiguousarray(img[:, ::-1])
  return img


def _flip_pil(im: Image.Image, rng: np.random.Generator,
              p: float = 0.5) -> Image.Image:
  if rng.random() < p:
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return im


def _resize_shorter(im: Image.Image, size: int,
                    resample: Image.Resampling) -> Image.Image:
  """torchvision's `Resize(size)`: shorter side to `size`, the longer side
  `int(size * long / short)` (truncated)."""
  w, h = im.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return im
  new_long = int(size * long / short)
  return im.resize((size, new_long) if w <= h else (new_long, size), resample)


def _center_crop(im: Image.Image, size: int) -> Image.Image:
  """torchvision's `CenterCrop(size)` (zero-padded first if smaller)."""
  w, h = im.size
  if w < size or h < size:
    canvas = Image.new('RGB', (max(w, size), max(h, size)))
    canvas.paste(im, ((max(size - w, 0)) // 2, (max(size - h, 0)) // 2))
    im, (w, h) = canvas, canvas.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return im.crop((left, top, left + size, top + size))


def eval_view(img: np.ndarray, size: int = 224, resize: int = 256,
              interpolation: str = 'bilinear') -> np.ndarray:
  """Evaluation view: shorter side to `resize`, centre crop `size`.

  Returns:
    uint8 `[size, size, 3]`.
  """
  im = _resize_shorter(_to_pil(img), resize, _resample(interpolation))
  return np.asarray(_center_crop(im, size))


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator,
                  pad: int = 4, fill=0.0) -> np.ndarray:
  """The CIFAR training view of `[N, H, W, C]` (one image: `img[None]`): pad
  by `pad` with `fill` per channel, random crop of the original size, flip
  half horizontally (torchvision's `RandomCrop(32, padding=4)` +
  `RandomHorizontalFlip()`). For normalised images pass the normalised
  black (`info['black']`) as `fill`: the reference pads the raw image with 0.
  """
  dy, dx, flip = pad_crop_flip_draws(rng, images.shape[0], pad)
  return apply_pad_crop_flip(images, dy, dx, flip, pad, fill)


def pad_crop_flip_draws(rng: np.random.Generator, n: int, pad: int = 4
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The random part of `pad_crop_flip` for `n` images: `(dy [N], dx [N],
  flip [N] bool)`, drawn in that order."""
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  flip = rng.random(n) < 0.5
  return dy, dx, flip


def apply_pad_crop_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray,
                        flip: np.ndarray, pad: int = 4, fill=0.0
                        ) -> np.ndarray:
  """`pad_crop_flip` of `[N, H, W, C]` with given offsets `dy`, `dx` (in
  `[0, 2 pad]`) and flips (`[N]` each): the crop of image i starts at row
  `dy[i]`, column `dx[i]` of the padded image."""
  n, h, w, c = images.shape
  padded = np.full((n, h + 2 * pad, w + 2 * pad, c), fill, images.dtype)
  padded[:, pad:pad + h, pad:pad + w] = images
  rows = dy[:, None] + np.arange(h)[None, :]            # [N, H]
  cols = dx[:, None] + np.arange(w)[None, :]            # [N, W]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


# ------------------------------------------------------------------ colour


def _enhance(kind: str, im: Image.Image, factor: float) -> Image.Image:
  """Pillow's enhancers; torchvision's `adjust_brightness/contrast/
  saturation` on PIL images are exactly these (contrast blends with the
  rounded mean of the grayscale image)."""
  cls = {'brightness': ImageEnhance.Brightness,
         'contrast': ImageEnhance.Contrast,
         'saturation': ImageEnhance.Color,
         'sharpness': ImageEnhance.Sharpness}[kind]
  return cls(im).enhance(factor)


def color_jitter_params(rng: np.random.Generator, brightness: float = 0.4,
                        contrast: float = 0.4, saturation: float = 0.4
                        ) -> list[tuple[str, float]]:
  """torchvision's `ColorJitter` draw: factors `U[max(0, 1 - v), 1 + v]` for
  each non-zero strength `v`, applied in a random order.

  Returns:
    `[(name, factor), ...]` in application order.
  """
  named = (('brightness', brightness), ('contrast', contrast),
           ('saturation', saturation))
  factors = {}
  for name, v in named:
    if v < 0:
      raise ValueError(f'colour jitter {name} must be >= 0, got {v}')
    if v > 0:
      factors[name] = float(rng.uniform(max(0.0, 1.0 - v), 1.0 + v))
  order = rng.permutation(len(named))
  return [(named[i][0], factors[named[i][0]]) for i in order
          if named[i][0] in factors]


def adjust_color(img: np.ndarray, ops: Sequence[tuple[str, float]]
                 ) -> np.ndarray:
  """Applies `[(name, factor), ...]` (names 'brightness', 'contrast',
  'saturation', 'sharpness') in order to uint8 `[H, W, 3]`."""
  im = _to_pil(img)
  for name, factor in ops:
    im = _enhance(name, im, factor)
  return np.asarray(im)


def _color_jitter_pil(im: Image.Image, rng: np.random.Generator,
                      brightness: float, contrast: float,
                      saturation: float) -> Image.Image:
  for name, factor in color_jitter_params(rng, brightness, contrast,
                                          saturation):
    im = _enhance(name, im, factor)
  return im


def color_jitter(img: np.ndarray, rng: np.random.Generator,
                 brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4) -> np.ndarray:
  """torchvision's `ColorJitter(brightness, contrast, saturation, hue=0)`
  on uint8 `[H, W, 3]`."""
  return np.asarray(_color_jitter_pil(_to_pil(img), rng, brightness,
                                      contrast, saturation))


# ------------------------------------------------------------- RandAugment


def _signed(v: float, rng: np.random.Generator) -> float:
  return -v if rng.random() < 0.5 else v


def _solarize_add(im: Image.Image, add: int, threshold: int = 128
                  ) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return im.point(lut * 3)


def _posterize(im: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` high bits (0 bits: black, as older Pillow did for
  timm; Pillow 13's `ImageOps.posterize` refuses 0)."""
  if bits >= 8:
    return im
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return im.point([i & mask for i in range(256)] * 3)


def _affine(im: Image.Image, coeffs, resample, fill) -> Image.Image:
  # Pillow maps each output pixel (x, y) to the input pixel
  # (a x + b y + c, d x + e y + f); shears are about the top-left corner,
  # as timm's.
  return im.transform(im.size, Image.Transform.AFFINE, coeffs,
                      resample=resample, fillcolor=fill)


def _apply_op_pil(im: Image.Image, name: str, level: float,
                  rng: np.random.Generator, resample: Image.Resampling,
                  fill: tuple[int, int, int]) -> Image.Image:
  """One RandAugment op at magnitude `level` in [0, 10] (timm's level ->
  argument maps; `rng` draws the sign of the signed ones)."""
  frac = level / MAX_LEVEL
  if name == 'AutoContrast':
    return ImageOps.autocontrast(im)
  if name == 'Equalize':
    return ImageOps.equalize(im)
  if name == 'Invert':
    return ImageOps.invert(im)
  if name == 'Rotate':  # [-30, 30] degrees about the centre.
    return im.rotate(_signed(frac * 30.0, rng), resample=resample,
                     fillcolor=fill)
  if name == 'Posterize':  # Keep 0..4 bits.
    return _posterize(im, int(frac * 4))
  if name == 'Solarize':  # Invert pixels >= threshold in [0, 256].
    return ImageOps.solarize(im, int(frac * 256))
  if name == 'SolarizeAdd':  # Add [0, 110] to pixels < 128.
    return _solarize_add(im, int(frac * 110))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    kind = 'saturation' if name == 'Color' else name.lower()
    return _enhance(kind, im, frac * 1.8 + 0.1)  # Factor in [0.1, 1.9].
  if name == 'ShearX':  # Shear factor in [-0.3, 0.3].
    return _affine(im, (1, _signed(frac * 0.3, rng), 0, 0, 1, 0), resample,
                   fill)
  if name == 'ShearY':
    return _affine(im, (1, 0, 0, _signed(frac * 0.3, rng), 1, 0), resample,
                   fill)
  if name == 'TranslateXRel':  # Up to 45% of the width.
    dx = _signed(frac * 0.45, rng) * im.size[0]
    return _affine(im, (1, 0, dx, 0, 1, 0), resample, fill)
  if name == 'TranslateYRel':
    dy = _signed(frac * 0.45, rng) * im.size[1]
    return _affine(im, (1, 0, 0, 0, 1, dy), resample, fill)
  raise ValueError(f'unknown RandAugment op {name!r}; choose from '
                   f'{", ".join(RAND_OPS)}')


def apply_op(img: np.ndarray, name: str, magnitude: float,
             rng: np.random.Generator,
             fill: tuple[int, int, int] = IMAGENET_FILL,
             interpolation: str = 'bilinear') -> np.ndarray:
  """One RandAugment op (a name in `RAND_OPS`) at a fixed magnitude, always
  applied, on uint8 `[H, W, 3]`; `rng` draws only the sign of signed ops."""
  im = _apply_op_pil(_to_pil(img), name, float(magnitude), rng,
                     _resample(interpolation), tuple(fill))
  return np.asarray(im)


def _rand_augment_pil(im: Image.Image, rng: np.random.Generator,
                      num_ops: int, magnitude: float, magnitude_std: float,
                      prob: float, fill, interpolation) -> Image.Image:
  choices = ((interpolation,) if isinstance(interpolation, str)
             else tuple(interpolation))
  resamples = [_resample(c) for c in choices]
  for k in rng.integers(0, len(RAND_OPS), size=num_ops):  # With replacement.
    if rng.random() > prob:
      continue
    level = magnitude
    if magnitude_std > 0:
      level = rng.normal(magnitude, magnitude_std)
    level = min(MAX_LEVEL, max(0.0, level))
    resample = resamples[int(rng.integers(len(resamples)))
                         if len(resamples) > 1 else 0]
    im = _apply_op_pil(im, RAND_OPS[k], level, rng, resample, fill)
  return im


def rand_augment(img: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 7.0, magnitude_std: float = 0.5,
                 prob: float = 0.5,
                 fill: tuple[int, int, int] = IMAGENET_FILL,
                 interpolation: str | Sequence[str] = RAND_INTERPOLATION
                 ) -> np.ndarray:
  """timm's RandAugment (`rand-n{num_ops}-m{magnitude}-mstd{magnitude_std}`)
  on uint8 `[H, W, 3]`.

  `num_ops` ops are drawn uniformly from `RAND_OPS` with replacement; each
  is applied with probability `prob` at magnitude `N(magnitude,
  magnitude_std)` clipped to [0, 10]. Geometric ops fill with `fill` and
  resample with `interpolation`, a name or a tuple to pick from per op: the
  reference's hparams set no interpolation, so timm picks bilinear or bicubic
  at random, which is the default here.
  """
  im = _rand_augment_pil(_to_pil(img), rng, num_ops, magnitude, magnitude_std,
                         prob, tuple(fill), interpolation)
  return np.asarray(im)


# ----------------------------------------------------------- normalisation


def normalise(img: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """uint8 `[..., W, C]` -> float32 `(img / 255 - mean) / std` (torchvision's
  `ToTensor` + `Normalize`, channels last; the same float32 operations, so
  the same values)."""
  x = np.asarray(img)
  c = x.shape[-1]
  mean = np.broadcast_to(np.asarray(mean, np.float32), (c,))
  std = np.broadcast_to(np.asarray(std, np.float32), (c,))
  if x.ndim >= 2:
    # Broadcasting a C-vector over a last axis of length C makes numpy's
    # inner loop C elements long; tiling it along W is ~10x faster.
    w = x.shape[-2]
    x = x.reshape(x.shape[:-2] + (w * c,))
    mean, std = np.tile(mean, w), np.tile(std, w)
  out = x.astype(np.float32)  # A copy: safe to update in place.
  out /= np.float32(255.0)
  out -= mean
  out /= std
  return out.reshape(np.shape(img))


# --------------------------------------------------------------- factories


def _stats(kind: str, mean, std) -> tuple[tuple[float, ...],
                                          tuple[float, ...]]:
  if kind == 'cifar':
    default = CIFAR_MEAN['cifar100'], CIFAR_STD['cifar100']
  else:
    default = IMAGENET_MEAN, IMAGENET_STD
  return (tuple(mean) if mean is not None else default[0],
          tuple(std) if std is not None else default[1])


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f'unknown augmentation {kind!r}; choose from '
                     f'{", ".join(KINDS)}')


def default_eval_resize(kind: str, image_size: int) -> int:
  """The evaluation resize: 256 for 224 (crop fraction 0.875, as timm's
  `floor(size / 0.875)`), and `image_size` itself for 'cifar' (32 x 32
  images are only normalised)."""
  if kind == 'cifar':
    return image_size
  return int(math.floor(image_size / 0.875))


def _finish(im, mean, std, as_uint8):
  arr = np.asarray(im)
  return arr if as_uint8 else normalise(arr, mean, std)


# The views are frozen dataclasses rather than closures so that they pickle
# into data-loader worker processes and print their settings.


@dataclasses.dataclass(frozen=True)
class EvalView:
  """Shorter side to `resize` (bilinear), centre crop `image_size`, then
  normalisation (unless `as_uint8`). `view(img uint8 [H, W, 3], rng=None)`."""
  image_size: int
  resize: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  as_uint8: bool = False

  def __call__(self, img: np.ndarray | Image.Image,
               rng: np.random.Generator | None = None) -> np.ndarray:
    del rng  # Deterministic.
    im = _resize_shorter(_to_pil(img), self.resize,
                         Image.Resampling.BILINEAR)
    return _finish(_center_crop(im, self.image_size), self.mean, self.std,
                   self.as_uint8)


@dataclasses.dataclass(frozen=True)
class TrainView:
  """A random training view (`kind` 'regular', 'rand' or 'cifar'; see
  `train_transform`). `view(img uint8 [H, W, 3], rng)`."""
  kind: str
  image_size: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  crop_scale: float = 0.6
  jitter: float = 0.4
  rand_num_ops: int = 2
  rand_magnitude: float = 7.0
  rand_magnitude_std: float = 0.5
  as_uint8: bool = False

  def __post_init__(self):
    if self.kind not in ('regular', 'rand', 'cifar'):
      raise ValueError(f'TrainView kind must be regular, rand or cifar, got '
                       f'{self.kind!r}')
    if not 0.0 < self.crop_scale <= 1.0:
      raise ValueError(f'crop_scale must be in (0, 1], got {self.crop_scale}')

  def __call__(self, img: np.ndarray | Image.Image,
               rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    if self.kind == 'cifar':
      arr = np.asarray(img)
      if arr.shape[:2] != (size, size):
        arr = EvalView(size, size, as_uint8=True)(arr)
      return _finish(pad_crop_flip(arr[None], rng)[0], self.mean, self.std,
                     self.as_uint8)
    im = _to_pil(img)
    box = random_resized_crop_box(im.size[1], im.size[0], rng,
                                  (self.crop_scale, 1.0))
    im = _resized_crop(im, box, size, Image.Resampling.BILINEAR)
    im = _flip_pil(im, rng)
    if self.kind == 'rand':
      j = self.jitter
      im = _color_jitter_pil(im, rng, j, j, j)
      im = _rand_augment_pil(im, rng, self.rand_num_ops, self.rand_magnitude,
                             self.rand_magnitude_std, 0.5, IMAGENET_FILL,
                             RAND_INTERPOLATION)
    return _finish(im, self.mean, self.std, self.as_uint8)


def eval_transform(kind: str, image_size: int = 224, *,
                   resize: int | None = None,
                   mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None,
                   as_uint8: bool = False) -> EvalView:
  """The deterministic evaluation view for an augmentation `kind`.

  Args:
    kind: one of `KINDS`; it picks the defaults (resize and statistics).
    image_size: output side.
    resize: shorter side before the centre crop; None is
      `default_eval_resize(kind, image_size)`.
    mean: normalisation mean per channel; None: ImageNet's, or CIFAR-100's
      for 'cifar'.
    std: the same for the standard deviation.
    as_uint8: return the uint8 view without normalising.

  Returns:
    `view(img uint8 [H, W, 3], rng=None) -> float32 [S, S, 3]` (picklable).
  """
  _check_kind(kind)
  mean, std = _stats(kind, mean, std)
  resize = default_eval_resize(kind, image_size) if resize is None else resize
  return EvalView(image_size, resize, mean, std, as_uint8)


def train_transform(kind: str, image_size: int = 224, *,
                    crop_scale: float = 0.6,
                    mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None,
                    jitter: float = 0.4, rand_num_ops: int = 2,
                    rand_magnitude: float = 7.0,
                    rand_magnitude_std: float = 0.5,
                    resize: int | None = None,
                    as_uint8: bool = False) -> EvalView | TrainView:
  """The random training view for an augmentation `kind`.

  Kinds:
    none: the evaluation view (deterministic).
    regular: random resized crop (area `U[crop_scale, 1]`, ratio 3/4..4/3,
      bilinear) to `image_size`, flip p=0.5.
    rand: regular, then colour jitter (`jitter` for brightness, contrast and
      saturation) and RandAugment (n, m, mstd as given, fill = ImageNet
      mean).
    cifar: pad-4 random crop + flip; images of another size are first
      brought to `image_size` by the evaluation view.

  Args:
    kind: one of `KINDS`.
    image_size: output side.
    crop_scale: smallest crop area fraction (the reference's `--crop_scale`).
    mean, std: normalisation statistics (see `eval_transform`).
    jitter: colour jitter strength ('rand').
    rand_num_ops, rand_magnitude, rand_magnitude_std: RandAugment settings.
    resize: evaluation resize for 'none' (see `eval_transform`).
    as_uint8: return the uint8 view without normalising.

  Returns:
    `view(img uint8 [H, W, 3], rng) -> float32 [S, S, 3]` (picklable).
  """
  _check_kind(kind)
  if kind == 'none':
    return eval_transform(kind, image_size, resize=resize, mean=mean,
                          std=std, as_uint8=as_uint8)
  mean, std = _stats(kind, mean, std)
  return TrainView(kind, image_size, mean, std, crop_scale, jitter,
                   rand_num_ops, rand_magnitude, rand_magnitude_std,
                   as_uint8)


# ------------------------------------------------------------ batch mixing


def smooth_one_hot(labels: np.ndarray, num_classes: int,
                   smoothing: float = 0.0) -> np.ndarray:
  """`[B]` ids -> float32 `[B, N]`: `1 - s + s / N` on the label, `s / N`
  elsewhere (timm's `mixup_target` values)."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [B] class ids, got {labels.shape}')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must be in [0, {num_classes}), got '
                     f'[{labels.min()}, {labels.max()}]')
  off = smoothing / num_classes
  out = np.full((labels.shape[0], num_classes), off, np.float32)
  out[np.arange(labels.shape[0]), labels] = 1.0 - smoothing + off
  return out


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator
               ) -> tuple[Box, float]:
  """timm's CutMix box for a mixing weight `lam`, and the corrected `lam`.

  The box has sides `int(side * sqrt(1 - lam))` around a uniform centre,
  clipped to the image; the returned lambda is the area fraction *kept*.

  Returns:
    `((top, bottom, left, right), lam)` with the box `[top:bottom,
    left:right]`.
  """
  cut = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * cut), int(width * cut)
  cy = int(rng.integers(0, height))
  cx = int(rng.integers(0, width))
  top = min(max(cy - cut_h // 2, 0), height)
  bottom = min(max(cy + cut_h // 2, 0), height)
  left = min(max(cx - cut_w // 2, 0), width)
  right = min(max(cx + cut_w // 2, 0), width)
  kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
  return (top, bottom, left, right), kept


def mix_batch(images: np.ndarray, labels: np.ndarray, num_classes: int,
              rng: np.random.Generator, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
              prob: float = 1.0, label_smoothing: float = 0.1
              ) -> tuple[np.ndarray, np.ndarray]:
  """Mixup / CutMix with soft labels (timm's `Mixup(mode='batch')`).

  With probability `prob` one `lam` is drawn for the whole batch: CutMix
  (`Beta(cutmix_alpha)`) with probability `switch_prob` when both alphas are
  positive, else Mixup (`Beta(mixup_alpha)`). Each image is mixed with its
  partner in the reversed batch (`images[::-1]`): Mixup blends
  `lam x + (1 - lam) x_rev`; CutMix pastes one box of `x_rev` into every
  image and sets `lam` to the area kept. Targets are `lam y + (1 - lam)
  y_rev` with label-smoothed one-hots. With both alphas 0 this is label
  smoothing alone. timm requires an even batch; an odd one is allowed here
  (its middle image is its own partner).

  Args:
    images: `[B, H, W, C]` (typically normalised float32); not modified.
    labels: `[B]` int class ids.
    num_classes: N.
    rng: the generator for lambda, the switch and the box.
    mixup_alpha: Mixup's Beta parameter (0 disables Mixup).
    cutmix_alpha: CutMix's Beta parameter (0 disables CutMix).
    switch_prob: probability of CutMix when both are enabled.
    prob: probability of mixing a batch at all.
    label_smoothing: s (0 for plain one-hots).

  Returns:
    `(images float32 [B, H, W, C], soft labels float32 [B, N])`, rows
    summing to 1.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError('mixup/cutmix alphas must be >= 0, got '
                     f'{mixup_alpha}, {cutmix_alpha}')
  if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0
          and 0.0 <= label_smoothing <= 1.0):
    raise ValueError('prob, switch_prob and label_smoothing must be in '
                     f'[0, 1], got {prob}, {switch_prob}, {label_smoothing}')
  images = np.asarray(images, np.float32)
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if images.shape[0] != targets.shape[0]:
    raise ValueError(f'{images.shape[0]} images but {targets.shape[0]} '
                     'labels')
  lam, use_cutmix = 1.0, False
  if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob:
    if mixup_alpha > 0 and cutmix_alpha > 0:
      use_cutmix = bool(rng.random() < switch_prob)
    else:
      use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
  if lam == 1.0:
    return images, targets
  if use_cutmix:
    (top, bottom, left, right), lam = cutmix_box(images.shape[1],
                                                 images.shape[2], lam, rng)
    mixed = images.copy()
    mixed[:, top:bottom, left:right] = images[::-1, top:bottom, left:right]
  else:
    mixed = images * np.float32(lam) + images[::-1] * np.float32(1.0 - lam)
  targets = targets * np.float32(lam) + targets[::-1] * np.float32(1.0 - lam)
  return mixed, targets
