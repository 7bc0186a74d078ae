r"""The precompute command: runs the frozen teacher once over the training
split and writes its features (`write_features`; the format and how training
reads it: `gendd_jax.data.features`).

  python -m gendd_jax.cli.precompute --config=configs/digits.py \
      --workdir=features/digits --config.teacher.checkpoint=<teacher export> \
      [--config.precompute.views=4] [--config.precompute.dtype=float16]

`--config` and `--workdir` are the flags of `gendd_jax.main`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

from array_record.python import array_record_module
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from gendd_jax import paths
from gendd_jax import sharding
from gendd_jax import teacher as teacher_lib
from gendd_jax.cli import common
from gendd_jax.data import features
from gendd_jax.errors import PrecomputeError

_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


def _features_spec(dim: int, num_classes: int, dtype: str, logits: bool):
  spec = {'id': np.int64, 'view': np.int32, 'label': np.int64,
          'feature': tfds.features.Tensor(shape=(dim,),
                                          dtype=np.dtype(dtype))}
  if logits:
    spec['logits'] = tfds.features.Tensor(shape=(num_classes,),
                                          dtype=np.float32)
  return tfds.features.FeaturesDict(spec)


def _batches(source: features.ImageSource, views: int, aug_seed: int,
             batch: int
             ) -> Iterator[tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
  """`(ids, view, images, labels)` in record order: view-major, then id."""
  for k in range(views + 1):
    for start in range(0, len(source.ids), batch):
      ids = source.ids[start:start + batch]
      images, labels, _ = zip(*(source.example(int(i), k, aug_seed)
                                for i in ids))
      yield ids, k, np.stack(images), np.asarray(labels, np.int64)


def write_features(out_dir: str, teacher_fn,
                   source: features.ImageSource, *, views: int,
                   aug_seed: int, batch: int, dtype: str, with_logits: bool,
                   shard_size: int, num_classes: int,
                   extra_meta: dict[str, Any] | None = None,
                   quiet: bool = False) -> dict[str, Any]:
  """Runs `teacher_fn(images) -> (feature, logits)` over every view and
  writes the dataset; returns its metadata (`precompute.json`, with
  `extra_meta` added)."""
  if views and not source.has_augmentation:
    raise PrecomputeError('precompute.views > 0 needs a training '
                          'augmentation (data.augment is "none")')
  version_dir = os.path.join(out_dir, features.FEATURES_NAME, '1.0.0')
  if paths.exists(os.path.join(version_dir, 'dataset_info.json')):
    raise PrecomputeError(f'{out_dir} already holds precomputed features')
  paths.makedirs(version_dir)
  total = len(source.ids) * (views + 1)
  num_shards = max(1, -(-total // shard_size))
  spec = None
  writers, lengths = [], [0] * num_shards
  written, t0 = 0, time.time()
  for ids, view, images, labels in _batches(source, views, aug_seed, batch):
    feat, logits = teacher_fn(images)
    feat = np.asarray(feat).astype(dtype)
    if spec is None:
      spec = _features_spec(feat.shape[-1], num_classes, dtype, with_logits)
      for s in range(num_shards):
        name = (f'{features.FEATURES_NAME}-train.array_record-{s:05d}-of-'
                f'{num_shards:05d}')
        writers.append(array_record_module.ArrayRecordWriter(
            os.path.join(version_dir, name), 'group_size:1'))
    for j, example_id in enumerate(ids):
      rec = dict(id=int(example_id), view=view, label=int(labels[j]),
                 feature=feat[j])
      if with_logits:
        rec['logits'] = np.asarray(logits[j], np.float32)
      shard = written // shard_size
      writers[shard].write(spec.serialize_example(rec))
      lengths[shard] += 1
      written += 1
    if not quiet:
      print(f'[precompute] {written}/{total} records '
            f'({written / max(time.time() - t0, 1e-9):.0f}/s)', flush=True)
  for w in writers:
    w.close()
  split = tfds.core.SplitInfo(
      name='train', shard_lengths=lengths, num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=version_dir, template=_TEMPLATE,
          dataset_name=features.FEATURES_NAME, split='train',
          filetype_suffix='array_record'))
  tfds.folder_dataset.write_metadata(
      data_dir=version_dir, features=spec, split_infos=[split],
      filename_template=_TEMPLATE, check_data=False)
  meta = dict(records=written, examples=len(source.ids), views=views,
              aug_seed=aug_seed, dtype=dtype, logits=with_logits,
              feature_dim=int(spec['feature'].shape[0]),
              seconds=time.time() - t0, **(extra_meta or {}))
  paths.write_text(os.path.join(out_dir, 'precompute.json'),
                   json.dumps(meta, indent=1))
  return meta


def run(config, workdir: str, quiet: bool = False) -> dict[str, Any]:
  """Loads the teacher and writes its features for `config.data`."""
  if jax.process_count() > 1:
    raise PrecomputeError('run precompute as a single process')
  p = config.precompute
  source = features.image_source(config)
  info = source.info
  mesh = sharding.mesh_from_config(config.mesh)
  teacher = teacher_lib.load(config, info, mesh)
  model = nnx.merge(teacher.graphdef, teacher.variables['params'],
                    teacher.variables['batch_stats'])
  fwd = jax.jit(lambda x: model(x, train=False))
  return write_features(
      workdir, lambda images: fwd(jnp.asarray(images)), source,
      views=int(p.views), aug_seed=int(p.aug_seed),
      batch=int(config.data.eval_batch_size), dtype=str(p.dtype),
      with_logits=bool(p.logits), shard_size=int(p.shard_size),
      num_classes=int(info['num_classes']),
      extra_meta=dict(dataset=config.data.name,
                      teacher=config.teacher.checkpoint), quiet=quiet)


def main(argv) -> None:
  config, workdir = common.config_and_workdir(argv)
  print(common.devices_line(), flush=True)
  meta = run(config, workdir)
  print(f'wrote {meta["records"]} records ({meta["examples"]} examples x '
        f'{meta["views"] + 1} views) to {workdir} in '
        f'{meta["seconds"]:.1f}s', flush=True)


if __name__ == '__main__':
  common.run(main)
