r"""Peak host memory of `python -m gendd_jax.cli.evaluate` and of
`python -m gendd_jax.cli.precompute` against the size of the split they
read: flat when batches stream.

  python -m benchmarks.bench_eval_memory [--sizes=500,2000,8000] \
      [--image_size=64] [--tools=evaluate,precompute] \
      [--out=docs/results/eval_memory_cpu2.json]

For each size it builds an image-folder dataset (random PNGs, 10 classes,
`size` images in each of train and val) with `gendd_jax.cli.build_dataset`'s
builder, writes an export of a randomly initialised CIFAR ResNet-8
classifier whose config reads that dataset through grain, and runs each tool
in a fresh process under `/usr/bin/time`, recording its peak resident set
size: `evaluate` over the val split, `precompute` (with that export as the
teacher) over the train split. The images alone would take
`size * image_size^2 * 3 * 4` bytes as float32.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from flax import nnx
import numpy as np
from PIL import Image

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import config_lib
from gendd_jax import stages
from gendd_jax.data import builders

_SIZES = flags.DEFINE_list('sizes', ['500', '2000', '8000'],
                           'Evaluation split sizes (images).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'Image side (pixels).')
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Evaluation batch size.')
_TOOLS = flags.DEFINE_list('tools', ['evaluate', 'precompute'],
                           'The commands to measure.')
_OUT = flags.DEFINE_string('out', None, 'Also write the results as JSON.')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLASSES = 10


def make_folder(root: str, size: int, side: int) -> str:
  """`size` random PNGs in each of train/ and val/ (10 classes)."""
  rng = np.random.default_rng(size)
  for split, n in (('train', size), ('val', size)):
    for i in range(n):
      folder = os.path.join(root, split, f'class{i % _CLASSES}')
      os.makedirs(folder, exist_ok=True)
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (side, side, 3)).astype(
          np.uint8)).save(buf, format='PNG')
      with open(os.path.join(folder, f'{i}.png'), 'wb') as f:
        f.write(buf.getvalue())
  return root


def bench_config(data_dir: str, side: int):
  """A CIFAR ResNet-8 teacher stage reading `folder:bench` in `data_dir`."""
  c = config_lib.cifar100('resnet8', 'resnet8')
  c.data = config_lib.image_data('folder:bench', image_size=side,
                                 augment='none', batch_size=_BATCH.value,
                                 eval_batch_size=_BATCH.value,
                                 eval_split='val')
  c.data.data_dir = data_dir
  c.stage = 'teacher'
  return c


# `bench_config` as a config file for the precompute command.
_CONFIG_FILE = """from gendd_jax import config_lib


def get_config():
  c = config_lib.cifar100('resnet8', 'resnet8')
  c.data = config_lib.image_data(
      'folder:bench', image_size={side}, augment='none', batch_size={batch},
      eval_batch_size={batch}, eval_split='val')
  c.data.data_dir = {data_dir!r}
  c.teacher.checkpoint = {export!r}
  return c
"""


def make_export(out: str, data_dir: str, side: int) -> None:
  """A random CIFAR ResNet-8 'teacher' export reading `folder:bench`."""
  c = bench_config(data_dir, side)
  info = dict(num_classes=_CLASSES, input_shape=(side, side, 3))
  model = stages.get('teacher').create_model(c, info)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  ckpt_lib.save_export(out, dict(params=params, batch_stats=batch_stats),
                       dict(stage='teacher', config=json.loads(c.to_json()),
                            num_classes=_CLASSES,
                            input_shape=list(info['input_shape']),
                            model='resnet8', step=0))


def measure(args: list[str], prefix: str) -> dict:
  """Peak RSS (MiB), wall seconds and the result line (the first stdout
  line starting with `prefix`) of one command."""
  t0 = time.time()
  proc = subprocess.run(
      ['/usr/bin/time', '-f', 'PEAK_KB %M', sys.executable, '-m', *args],
      cwd=_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT),
      capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-2000:])
  peak = [ln for ln in proc.stderr.splitlines() if ln.startswith('PEAK_KB')]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
  return dict(peak_rss_mib=int(peak[-1].split()[1]) / 1024,
              seconds=time.time() - t0, result=line[-1])


def measure_tool(tool: str, tmp: str, size: int, data_dir: str, export: str,
                 side: int) -> dict:
  if tool == 'evaluate':
    return measure(['gendd_jax.cli.evaluate', f'--checkpoint={export}',
                    '--mode=logits'], 'logits')
  config = os.path.join(tmp, f'config{size}.py')
  with open(config, 'w') as f:
    f.write(_CONFIG_FILE.format(data_dir=data_dir, side=side, export=export,
                                batch=_BATCH.value))
  return measure(['gendd_jax.cli.precompute', f'--config={config}',
                  f'--workdir={os.path.join(tmp, f"features{size}")}'],
                 'wrote')


def main(argv):
  del argv
  side = _IMAGE_SIZE.value
  rows = []
  with tempfile.TemporaryDirectory(prefix='gendd_bench_mem_') as tmp:
    for size in (int(s) for s in _SIZES.value):
      src = make_folder(os.path.join(tmp, f'src{size}'), size, side)
      data_dir = os.path.join(tmp, f'tfds{size}')
      builders.build('folder', src, data_dir, 'bench', log=lambda *_: None)
      export = os.path.join(tmp, f'export{size}')
      make_export(export, data_dir, side)
      for tool in _TOOLS.value:
        row = dict(tool=tool, images=size,
                   split_float32_mib=size * side * side * 3 * 4 / 2**20,
                   **measure_tool(tool, tmp, size, data_dir, export, side))
        rows.append(row)
        print(f'{tool:10s} {size:6d} images ({row["split_float32_mib"]:7.1f} '
              f'MiB as float32): peak RSS {row["peak_rss_mib"]:7.1f} MiB, '
              f'{row["seconds"]:.1f}s  [{row["result"]}]', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(dict(image_size=side, batch_size=_BATCH.value, rows=rows), f,
                indent=1)


if __name__ == '__main__':
  app.run(main)
