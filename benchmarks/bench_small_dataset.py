r"""A small prepared dataset streamed through grain against served from memory
(`data.in_memory_limit_mb`), as JSON and a Markdown table.

  python -m benchmarks.bench_small_dataset [--num_images=8000] \
      [--train_steps=60,300] [--input_batches=100] \
      [--out=docs/results/small_dataset_cpu2]

Builds, in a temporary folder, an `npz:` dataset as `python -m
gendd_jax.cli.build_dataset npz` does: `num_images` digit-like 28 x 28
grayscale images (scikit-learn's 8 x 8 digits upscaled bilinearly, shifted
by up to 2 pixels, with pixel noise; stored as PNG) and 1,000 test images,
10 classes. Then, for each path (limit 0: streamed, decoded per example;
the default limit: decoded once and served from memory):

  startup   seconds of `data.open_dataset` and the first batch (the decode,
            for the memory path);
  input     images/s of drawing training batches alone, for each view in
            `views` (after one warm-up batch);
  train     images/s of training the bundled MLP (configs/digits.py's
            teacher, hidden 256-64, batch 128, view 'none') through
            `train.train_and_evaluate`: the difference of two runs of
            `train_steps` steps, which cancels compilation, set-up and the
            final evaluation.

Both paths give the same batches (`tests/test_decoded.py`); only the cost
differs. The machine's cores are shared: the load average at the start is
recorded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from gendd_jax import config_lib
from gendd_jax import data as data_lib
from gendd_jax import train
from gendd_jax.data import builders
from gendd_jax.data import memory
from gendd_jax.data import streams

_NUM_IMAGES = flags.DEFINE_integer('num_images', 8000, 'Training images.')
_NUM_TEST = flags.DEFINE_integer('num_test', 1000, 'Test images.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Training batch size.')
_TRAIN_STEPS = flags.DEFINE_list('train_steps', ['60', '300'],
                                 'Two run lengths; images/s from their '
                                 'difference.')
_INPUT_BATCHES = flags.DEFINE_integer('input_batches', 100,
                                      'Batches timed per input figure.')
_VIEWS = flags.DEFINE_list('views', ['none', 'cifar', 'regular'],
                           'Views of the input figures.')
_OUT = flags.DEFINE_string('out', '', 'Writes <out>.json and <out>.md.')

_PATHS = (('streamed', 0), ('in memory',
                            streams.DEFAULT_IN_MEMORY_LIMIT_MB))


def digit_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` uint8 `[28, 28]` digit-like images and their labels."""
  digits, labels = memory.load_digits()
  rng = np.random.default_rng(seed)
  pick = rng.integers(0, len(labels), n)
  out = np.empty((n, 28, 28), np.uint8)
  for j, i in enumerate(pick):
    small = Image.fromarray((digits[i].reshape(8, 8) * 255).astype(np.uint8))
    big = np.asarray(small.resize((24, 24), Image.Resampling.BILINEAR),
                     np.float32)
    canvas = np.zeros((28, 28), np.float32)
    dy, dx = rng.integers(0, 5, 2)
    canvas[dy:dy + 24, dx:dx + 24] = big
    canvas += rng.normal(0, 8, canvas.shape)
    out[j] = np.clip(canvas, 0, 255).astype(np.uint8)
  return out, labels[pick].astype(np.int64)


def build(tmp: str, num_images: int, num_test: int) -> str:
  """The npz dataset `npz:digits_small` in `<tmp>/tfds`; returns data_dir."""
  train_x, train_y = digit_like(num_images, 0)
  test_x, test_y = digit_like(num_test, 1)
  src = os.path.join(tmp, 'digits_small.npz')
  np.savez(src, train_images=train_x, train_labels=train_y,
           test_images=test_x, test_labels=test_y)
  data_dir = os.path.join(tmp, 'tfds')
  builders.build('npz', src, data_dir, 'digits_small',
                 log=lambda *a, **k: None)
  return data_dir


def _digits_config():
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                      'digits.py')
  spec = importlib.util.spec_from_file_location('digits_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def config(data_dir: str, limit_mb: int, augment: str = 'none',
           steps: int = 0):
  """configs/digits.py's MLP teacher on the npz dataset."""
  c = _digits_config()
  c.data = config_lib.image_data(
      'npz:digits_small', image_size=28, augment=augment,
      batch_size=_BATCH.value, eval_batch_size=500, eval_split='test')
  c.data.data_dir = data_dir
  c.data.in_memory_limit_mb = limit_mb
  c.stage = 'teacher'
  if steps:
    epoch = _NUM_IMAGES.value // _BATCH.value
    c.stages.teacher.epochs = steps / epoch
  c.log_every_steps = 10 ** 6
  c.checkpoint_every_steps = 0
  c.eval_every_steps = 0
  return c


def input_rate(data_dir: str, limit_mb: int, augment: str, batches: int
               ) -> dict[str, float]:
  """Start-up seconds and images/s of the training batches alone."""
  t0 = time.perf_counter()
  ds = data_lib.open_dataset(config(data_dir, limit_mb, augment).data, seed=0)
  next(ds.train)  # The decode (memory) or threads started (grain).
  startup = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(ds.train)
  rate = batches * _BATCH.value / (time.perf_counter() - t0)
  return dict(startup_s=round(startup, 3), images_per_s=round(rate, 1),
              path=type(ds.train.chosen).__name__)


def train_rate(tmp: str, data_dir: str, limit_mb: int) -> dict[str, float]:
  """Training images/s from two run lengths (their difference)."""
  short, long = (int(s) for s in _TRAIN_STEPS.value)
  seconds = {}
  for steps in (short, long):
    workdir = os.path.join(tmp, f'run_{limit_mb}_{steps}')
    t0 = time.perf_counter()
    res = train.train_and_evaluate(config(data_dir, limit_mb, steps=steps),
                                   workdir, quiet=True)
    seconds[steps] = time.perf_counter() - t0
    if res['steps'] != steps:
      raise RuntimeError(f'ran {res["steps"]} steps, not {steps}')
  rate = (long - short) * _BATCH.value / (seconds[long] - seconds[short])
  return dict(images_per_s=round(rate, 1),
              steps_per_s=round(rate / _BATCH.value, 2),
              wall_s={str(k): round(v, 2) for k, v in seconds.items()},
              accuracy=res['accuracy'])


def markdown(out: dict) -> str:
  s = out['setting']
  cores = out['machine']['cpu_count']
  lines = [
      f'# A small prepared dataset: streamed vs in memory ({cores} cores)', '',
      'Command: `python -m benchmarks.bench_small_dataset --out='
      'docs/results/small_dataset_cpu2`', '',
      f'`npz:` dataset of {s["num_images"]} digit-like {s["image_hw"][0]}x'
      f'{s["image_hw"][1]} images (PNG); batch {s["batch_size"]}; load '
      f'average at the start {out["machine"]["load_avg_at_start"]}.', '',
      '| | streamed (limit 0) | in memory | ratio |', '|---|---|---|---|']
  a, b = out['streamed'], out['in memory']
  ta, tb = a['train']['images_per_s'], b['train']['images_per_s']
  lines.append(f'| training the MLP, images/s | {ta:.0f} | {tb:.0f} | '
               f'{tb / ta:.1f}x |')
  sa, sb = a['train']['steps_per_s'], b['train']['steps_per_s']
  lines.append(f'| training the MLP, steps/s | {sa:.1f} | {sb:.1f} | |')
  for view in s['views']:
    ia, ib = a['input'][view]['images_per_s'], b['input'][view]['images_per_s']
    lines.append(f'| input only, view `{view}`, images/s | {ia:.0f} | '
                 f'{ib:.0f} | {ib / ia:.1f}x |')
  ua = a['input'][s['views'][0]]['startup_s']
  ub = b['input'][s['views'][0]]['startup_s']
  lines.append(f'| start-up (open, first batch), s | {ua:.2f} | {ub:.2f} '
               '| |')
  acc = [x['train']['accuracy'].get('acc') for x in (a, b)]
  lines.append(f'| test accuracy after {s["train_steps"][1]} steps, % | '
               f'{acc[0]:.2f} | {acc[1]:.2f} | |')
  lines += ['', 'Both paths yield the same batches (tests/test_decoded.py), '
            'hence the same accuracy; the training figures are the '
            'difference of runs of ' + ' and '.join(
                str(n) for n in s['train_steps']) + ' steps. Figures '
            'depend on the load of the shared machine.']
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  jax.config.update('jax_platforms', 'cpu')
  load = os.getloadavg()
  out = dict(
      machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   load_avg_at_start=[round(x, 2) for x in load],
                   python=platform.python_version(), jax=jax.__version__),
      setting=dict(num_images=_NUM_IMAGES.value, num_test=_NUM_TEST.value,
                   image_hw=[28, 28], batch_size=_BATCH.value,
                   train_steps=[int(s) for s in _TRAIN_STEPS.value],
                   input_batches=_INPUT_BATCHES.value,
                   views=list(_VIEWS.value), model='digits MLP teacher '
                   '(hidden 256-64), view none'))
  with tempfile.TemporaryDirectory(prefix='bench_small_') as tmp:
    t0 = time.perf_counter()
    data_dir = build(tmp, _NUM_IMAGES.value, _NUM_TEST.value)
    out['setting']['build_s'] = round(time.perf_counter() - t0, 1)
    for name, limit in _PATHS:
      out[name] = dict(
          limit_mb=limit,
          input={v: input_rate(data_dir, limit, v, _INPUT_BATCHES.value)
                 for v in _VIEWS.value},
          train=train_rate(tmp, data_dir, limit))
  text = json.dumps(out, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value + '.json', 'w') as f:
      f.write(text + '\n')
    with open(_OUT.value + '.md', 'w') as f:
      f.write(markdown(out))


if __name__ == '__main__':
  app.run(main)
