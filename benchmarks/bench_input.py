r"""Input throughput on one CPU core: decode + augment images/s, as JSON.

  python -m benchmarks.bench_input [--num_images=200] [--repeats=3]

Generates `num_images` synthetic JPEGs in memory (ImageNet-like: 500 x 375,
quality 90, smooth multi-scale random texture plus grain, about 100 KB each,
close to ImageNet's average file), then times, in this single process pinned
to one core:

  decode          `augment.decode` alone;
  regular         decode + the 'regular' training view + normalisation;
  rand            decode + the 'rand' view (+ colour jitter, RandAugment);
  eval            decode + resize 256 / centre crop 224 + normalisation;
  mixup, cutmix   `augment.mix_batch` on a float32 batch of `mix_batch`
                  224 x 224 images (per image of the batch).

Each figure is the median over `repeats` passes (min and max given too).
Every example gets its own `np.random.default_rng((seed, i))`, as grain's
`RandomMap` does. The pipeline needs `demand / figure` cores (worker
processes) to feed an accelerator consuming `demand` images/s.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from gendd_jax.data import augment

_NUM_IMAGES = flags.DEFINE_integer('num_images', 200,
                                   'Synthetic JPEGs per pass.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed passes per figure.')
_HEIGHT = flags.DEFINE_integer('height', 375, 'Source image height.')
_WIDTH = flags.DEFINE_integer('width', 500, 'Source image width.')
_QUALITY = flags.DEFINE_integer('quality', 90, 'JPEG quality.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Training view side.')
_MIX_BATCH = flags.DEFINE_integer('mix_batch', 128,
                                  'Batch size of the mixup/cutmix figures.')
_SEED = flags.DEFINE_integer('data_seed', 0, 'Seed of images and augmentation.')
_PIN = flags.DEFINE_bool('pin', True, 'Pin the process to one CPU core.')


def synthetic_image(rng: np.random.Generator, height: int, width: int
                    ) -> np.ndarray:
  """uint8 `[H, W, 3]`: colour noise at four scales plus luminance grain
  (JPEG sizes close to natural photos; pure noise would be far larger)."""
  acc = np.zeros((height, width, 3), np.float32)
  for cells, amp in ((4, 60.0), (16, 35.0), (64, 25.0), (200, 15.0)):
    low = rng.normal(size=(max(2, cells * height // width), cells, 3))
    for c in range(3):
      plane = Image.fromarray(low[..., c].astype(np.float32), mode='F')
      acc[..., c] += amp * np.asarray(
          plane.resize((width, height), Image.Resampling.BICUBIC))
  acc += rng.normal(scale=14.0, size=(height, width, 1))
  return np.clip(acc + 128.0, 0, 255).astype(np.uint8)


def synthetic_jpegs(n: int, height: int, width: int, quality: int,
                    seed: int) -> list[bytes]:
  """`n` encoded JPEGs of `synthetic_image`s."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(rng, height, width)).save(
        buf, format='JPEG', quality=quality)
    out.append(buf.getvalue())
  return out


def _rates(run, count: int, repeats: int) -> dict[str, float]:
  """Images/s of `run()` processing `count` images: median/min/max."""
  run()  # Warm-up (imports, caches).
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    rates.append(count / (time.perf_counter() - t0))
  return dict(images_per_sec=statistics.median(rates), min=min(rates),
              max=max(rates),
              ms_per_image=1e3 / statistics.median(rates))


def bench_views(jpegs: list[bytes], image_size: int, repeats: int,
                seed: int) -> dict:
  """Decode (+ view) throughput for each pipeline on `jpegs`."""
  views = {
      'decode': None,
      'regular': augment.train_transform('regular', image_size),
      'rand': augment.train_transform('rand', image_size),
      'eval': augment.eval_transform('regular', image_size),
  }
  out = {}
  for name, view in views.items():
    def run(view=view):
      for i, data in enumerate(jpegs):
        img = augment.decode(data)
        if view is not None:
          view(img, np.random.default_rng((seed, i)))
    out[name] = _rates(run, len(jpegs), repeats)
  return out


def bench_mix(batch: int, image_size: int, repeats: int, seed: int) -> dict:
  """`mix_batch` throughput (mixup only / cutmix only, smoothing 0.1)."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, image_size, image_size, 3)).astype(
      np.float32)
  labels = rng.integers(0, 1000, batch)
  out = {}
  for name, (mixup, cutmix) in (('mixup', (0.2, 0.0)),
                                ('cutmix', (0.0, 1.0))):
    calls = 3

    def run(mixup=mixup, cutmix=cutmix):
      for k in range(calls):
        augment.mix_batch(images, labels, 1000, np.random.default_rng(k),
                          mixup, cutmix, label_smoothing=0.1)
    out[name] = _rates(run, batch * calls, repeats)
  return out


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv):
  del argv
  import PIL  # pylint: disable=g-import-not-at-top
  pinned = None
  if _PIN.value and hasattr(os, 'sched_setaffinity'):
    pinned = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {pinned})
  load = os.getloadavg()
  jpegs = synthetic_jpegs(_NUM_IMAGES.value, _HEIGHT.value, _WIDTH.value,
                          _QUALITY.value, _SEED.value)
  out = dict(
      machine=dict(platform=platform.platform(), cpu=_cpu_model(),
                   cpu_count=os.cpu_count(), pinned_cpu=pinned,
                   load_avg_at_start=[round(x, 2) for x in load],
                   python=platform.python_version(), numpy=np.__version__,
                   pillow=PIL.__version__),
      setting=dict(num_images=len(jpegs), source_hw=[_HEIGHT.value,
                                                     _WIDTH.value],
                   jpeg_quality=_QUALITY.value,
                   mean_jpeg_kb=round(sum(map(len, jpegs)) / len(jpegs) / 1e3,
                                      1),
                   image_size=_IMAGE_SIZE.value, mix_batch=_MIX_BATCH.value,
                   repeats=_REPEATS.value, processes=1),
      per_core=bench_views(jpegs, _IMAGE_SIZE.value, _REPEATS.value,
                           _SEED.value))
  out['per_core'].update(bench_mix(_MIX_BATCH.value, _IMAGE_SIZE.value,
                                   _REPEATS.value, _SEED.value))
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  app.run(main)
