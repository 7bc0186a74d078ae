r"""The precompute command: runs the frozen teacher once over the training
split and writes its features (`write_features`; the format and how training
reads it: `gendd_jax.data.features`).

  python -m gendd_jax.cli.precompute --config=configs/digits.py \
      --workdir=features/digits --config.teacher.checkpoint=<teacher export> \
      [--config.precompute.views=4] [--config.precompute.dtype=float16]

`--config` and `--workdir` are the flags of `gendd_jax.main`; with
`--distributed` every process of a slice takes its share of the records,
data-parallel over all devices. `--workdir` may be `gs://...`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from typing import Any

from absl import flags
from array_record.python import array_record_module
from flax import nnx
import jax
import numpy as np
import tensorflow_datasets as tfds

from gendd_jax import paths
from gendd_jax import sharding
from gendd_jax import teacher as teacher_lib
from gendd_jax.cli import common
from gendd_jax.data import features
from gendd_jax.errors import PrecomputeError

for _name in ('config', 'workdir', 'distributed', 'coordinator_address',
              'num_processes', 'process_id', 'heartbeat_timeout'):
  flags.declare_key_flag(_name)

_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


def _features_spec(dim: int, num_classes: int, dtype: str, logits: bool):
  spec = {'id': np.int64, 'view': np.int32, 'label': np.int64,
          'feature': tfds.features.Tensor(shape=(dim,),
                                          dtype=np.dtype(dtype))}
  if logits:
    spec['logits'] = tfds.features.Tensor(shape=(num_classes,),
                                          dtype=np.float32)
  return tfds.features.FeaturesDict(spec)


def _ranges(total: int, count: int) -> list[tuple[int, int]]:
  """Contiguous record ranges `[lo, hi)`, one per process, in order."""
  per = -(-total // count)
  return [(min(total, p * per), min(total, (p + 1) * per))
          for p in range(count)]


def _shard_lengths(ranges, shard_size: int) -> list[list[int]]:
  """Per process, the lengths of the shards its range is written in."""
  out = []
  for lo, hi in ranges:
    n = hi - lo
    out.append([min(shard_size, n - s) for s in range(0, n, shard_size)])
  return out


def write_features(out_dir: str, teacher_fn,
                   source: features.ImageSource, *, views: int,
                   aug_seed: int, batch: int, dtype: str, with_logits: bool,
                   shard_size: int, num_classes: int,
                   extra_meta: dict[str, Any] | None = None,
                   quiet: bool = False, process_index: int = 0,
                   process_count: int = 1) -> dict[str, Any]:
  """Runs `teacher_fn(images) -> (feature, logits)` over every view and
  writes the dataset; returns its metadata (`precompute.json`, with
  `extra_meta` added).

  Records are view-major, then in `source.ids` order, whatever the process
  count: process `p` computes and writes the `p`-th contiguous range of them
  (its own shard files), `batch // process_count` images per call of
  `teacher_fn`, which sees this process's slice of a global batch of `batch`
  (every process calls it equally often; short slices are padded). A remote
  `out_dir` is written on local disk and uploaded.
  """
  if views and not source.has_augmentation:
    raise PrecomputeError('precompute.views > 0 needs a training '
                          'augmentation (data.augment is "none")')
  if batch % process_count:
    raise PrecomputeError(f'the batch size {batch} is not divisible by the '
                          f'{process_count} processes')
  version = os.path.join(features.FEATURES_NAME, '1.0.0')
  if paths.exists(os.path.join(out_dir, version, 'dataset_info.json')):
    raise PrecomputeError(f'{out_dir} already holds precomputed features')
  remote = paths.is_remote(out_dir)
  local_root = tempfile.mkdtemp(prefix='gendd-precompute-') if remote else \
      out_dir
  try:
    version_dir = os.path.join(local_root, version)
    paths.makedirs(version_dir)
    n = len(source.ids)
    total = n * (views + 1)
    ranges = _ranges(total, process_count)
    lengths = _shard_lengths(ranges, shard_size)
    num_shards = sum(len(x) for x in lengths)
    first_shard = sum(len(x) for x in lengths[:process_index])
    lo, hi = ranges[process_index]
    local_batch = batch // process_count
    steps = max(1, -(-max(b - a for a, b in ranges) // local_batch))
    spec = None  # From the first batch's feature width.
    writers = [array_record_module.ArrayRecordWriter(
        os.path.join(version_dir, f'{features.FEATURES_NAME}-train.array_record'
                     f'-{first_shard + j:05d}-of-{num_shards:05d}'),
        'group_size:1') for j in range(len(lengths[process_index]))]
    t0 = time.time()
    try:
      for step in range(steps):
        records = list(range(lo + step * local_batch,
                             min(hi, lo + (step + 1) * local_batch)))
        examples = [source.example(int(source.ids[r % n]), r // n, aug_seed)
                    for r in records]
        images = [e[0] for e in examples]
        pad = local_batch - len(images)
        filler = images[-1] if images else _any_image(source, aug_seed)
        feat, logits = teacher_fn(np.stack(images + [filler] * pad))
        feat = np.asarray(feat).astype(dtype)
        if spec is None:
          spec = _features_spec(feat.shape[-1], num_classes, dtype,
                                with_logits)
        for j, r in enumerate(records):
          rec = dict(id=int(source.ids[r % n]), view=r // n,
                     label=int(examples[j][1]), feature=feat[j])
          if with_logits:
            rec['logits'] = np.asarray(logits[j], np.float32)
          writers[(r - lo) // shard_size].write(spec.serialize_example(rec))
        if not quiet and process_index == 0:
          done = min(total, (step + 1) * batch)
          print(f'[precompute] {done}/{total} records '
                f'({done / max(time.time() - t0, 1e-9):.0f}/s)', flush=True)
    finally:
      for w in writers:
        w.close()
    if remote:
      paths.upload(local_root, out_dir)
    sharding.barrier('precompute-shards')
    meta = dict(records=total, examples=n, views=views, aug_seed=aug_seed,
                dtype=dtype, logits=with_logits,
                feature_dim=int(spec['feature'].shape[0]),
                seconds=time.time() - t0, processes=process_count,
                **(extra_meta or {}))
    if process_index == 0:
      split = tfds.core.SplitInfo(
          name='train', shard_lengths=[x for ls in lengths for x in ls],
          num_bytes=0, filename_template=tfds.core.ShardedFileTemplate(
              data_dir=version_dir, template=_TEMPLATE,
              dataset_name=features.FEATURES_NAME, split='train',
              filetype_suffix='array_record'))
      tfds.folder_dataset.write_metadata(
          data_dir=version_dir, features=spec, split_infos=[split],
          filename_template=_TEMPLATE, check_data=False)
      paths.write_text(os.path.join(local_root, 'precompute.json'),
                       json.dumps(meta, indent=1))
      if remote:  # The metadata goes up after every shard is there.
        shards = {f for f in paths.files(local_root) if '.array_record-' in f}
        paths.upload(local_root, out_dir, skip=shards)
    sharding.barrier('precompute-done')
    return meta
  finally:
    if remote:
      shutil.rmtree(local_root, ignore_errors=True)


def _any_image(source: features.ImageSource, aug_seed: int) -> np.ndarray:
  return source.example(int(source.ids[0]), 0, aug_seed)[0]


def run(config, workdir: str, quiet: bool = False) -> dict[str, Any]:
  """Loads the teacher and writes its features for `config.data`,
  data-parallel over every device of every process."""
  p = config.precompute
  source = features.image_source(config)
  info = source.info
  mesh = sharding.mesh_from_config(config.mesh)
  batch = int(config.data.eval_batch_size)
  try:
    sharding.check_batch_size(batch, mesh, 'data.eval_batch_size')
  except ValueError as e:
    raise PrecomputeError(str(e)) from e
  teacher = teacher_lib.load(config, info, mesh)
  graphdef = teacher.graphdef
  data = sharding.data_sharded(mesh)

  @functools.partial(jax.jit, out_shardings=(data, data))
  def fwd(variables, image):  # Weights as arguments, not folded constants.
    return nnx.merge(graphdef, variables['params'],
                     variables['batch_stats'])(image, train=False)

  def teacher_fn(images):
    out = fwd(teacher.variables,
              sharding.shard_batch({'image': images}, mesh)['image'])
    return sharding.local_rows(out, mesh)

  return write_features(
      workdir, teacher_fn, source,
      views=int(p.views), aug_seed=int(p.aug_seed), batch=batch,
      dtype=str(p.dtype), with_logits=bool(p.logits),
      shard_size=int(p.shard_size), num_classes=int(info['num_classes']),
      extra_meta=dict(dataset=config.data.name,
                      teacher=config.teacher.checkpoint), quiet=quiet,
      process_index=jax.process_index(), process_count=jax.process_count())


def main(argv) -> None:
  config, workdir = common.config_and_workdir(argv)
  common.initialize_distributed()
  print(common.devices_line(), flush=True)
  meta = run(config, workdir)
  if jax.process_index() == 0:
    print(f'wrote {meta["records"]} records ({meta["examples"]} examples x '
          f'{meta["views"] + 1} views) to {workdir} in '
          f'{meta["seconds"]:.1f}s', flush=True)


def entry() -> None:
  """The `gendd-precompute` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
