r"""Precompute teacher features once, then train without the teacher forward.

  python -m gendd_jax.precompute --config=configs/digits.py \
      --workdir=features/digits --config.teacher.checkpoint=<teacher export> \
      [--config.precompute.views=4] [--config.precompute.dtype=float16]

runs the frozen teacher (`config.teacher.checkpoint`) over the training split
and writes a TFDS dataset (`array_record` shards plus `dataset_info.json`,
readable with `tfds.builder_from_directory(workdir).as_data_source('train')`)
of records `{id, view, feature, label[, logits]}`:

* view 0 is the deterministic evaluation view of every example;
* views 1..K (`precompute.views = K`) are training augmentations, view `k` of
  example `id` drawn with `np.random.default_rng((aug_seed, id, k))`, so the
  student sees exactly the image the teacher saw; `aug_seed` is recorded in
  `precompute.json`.

Training reads it with `config.teacher.source = 'precomputed'` and
`config.teacher.features = <workdir>`: the stream runs over the records (each
epoch visits every (id, view) once), rebuilds each record's view of the image
and takes the stored feature as the teacher's, so the teacher forward is
skipped (the teacher checkpoint still provides the classifier `W_cls`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import data as data_lib
from gendd_jax.errors import PrecomputeError

FEATURES_NAME = 'gendd_teacher_features'
_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


# ---------------------------------------------------------------------------
# Views of the training images.
# ---------------------------------------------------------------------------


def view_rng(aug_seed: int, example_id: int, view: int
             ) -> np.random.Generator:
  """The random stream of view `view` of example `example_id`."""
  return np.random.default_rng((int(aug_seed), int(example_id), int(view)))


@dataclasses.dataclass
class ImageSource:
  """Random access to the training examples by id, in any view.

  Attributes:
    ids: `[N]` example ids, in a fixed order.
    example: `(id, k, aug_seed) -> (image, label, label_mask)`: view 0 is
      the evaluation view, view k >= 1 the training augmentation drawn with
      `view_rng(aug_seed, id, k)`; the label is -1 where there is none. One
      record read per call, so nothing is scanned ahead of time.
    has_augmentation: whether views >= 1 differ from view 0.
    info: `num_classes` and `input_shape` of the dataset.
  """
  ids: np.ndarray
  example: Callable[[int, int, int], tuple[np.ndarray, int, bool]]
  has_augmentation: bool
  info: dict[str, Any]


def in_memory_source(d, seed: int) -> ImageSource:
  """The training split of an in-memory dataset (digits, CIFAR)."""
  train, _, info = data_lib.create_splits(
      d.name, fold=d.fold, num_folds=d.num_folds,
      label_fraction=d.label_fraction, seed=seed,
      data_dir=d.data_dir or None)
  position = {int(i): p for p, i in enumerate(train.index)}
  fill = info.get('black', 0.0)

  def example(example_id: int, k: int, aug_seed: int):
    p = position[int(example_id)]
    image = train.images[p]
    if k and d.augment != 'none':
      rng = view_rng(aug_seed, example_id, k)
      image = data_lib.pad_crop_flip(image[None], rng, fill=fill)[0]
    return image, int(train.labels[p]), bool(train.label_mask[p])

  return ImageSource(ids=train.index.astype(np.int64), example=example,
                     has_augmentation=d.augment != 'none', info=info)


def grain_source(d) -> ImageSource:
  """The training split of a TFDS/builder dataset."""
  from gendd_jax import augment  # pylint: disable=g-import-not-at-top
  from gendd_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  src = ip.open_source(d.name, d.train_split, d.data_dir or None)
  train_view = augment.train_transform(d.augment, d.image_size)
  eval_view = augment.eval_transform(d.augment, d.image_size)

  def example(example_id: int, k: int, aug_seed: int):
    record = src[int(example_id)]
    image = record['image']
    if isinstance(image, (bytes, np.bytes_)):
      image = augment.decode(bytes(image))
    if k == 0:
      image = eval_view(np.asarray(image), np.random.default_rng(0))
    else:
      image = train_view(np.asarray(image),
                         view_rng(aug_seed, example_id, k))
    label = int(record.get('label', -1))
    return image, label, label >= 0

  info = dict(num_classes=int(d.num_classes) or ip.source_num_classes(src),
              input_shape=(d.image_size, d.image_size, 3))
  return ImageSource(ids=np.arange(len(src), dtype=np.int64),
                     example=example, has_augmentation=d.augment != 'none',
                     info=info)


def image_source(config) -> ImageSource:
  d = config.data
  if d.name in data_lib.AVAILABLE:
    return in_memory_source(d, config.seed)
  return grain_source(d)


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def _features_spec(dim: int, num_classes: int, dtype: str, logits: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = {'id': np.int64, 'view': np.int32, 'label': np.int64,
          'feature': tfds.features.Tensor(shape=(dim,),
                                          dtype=np.dtype(dtype))}
  if logits:
    spec['logits'] = tfds.features.Tensor(shape=(num_classes,),
                                          dtype=np.float32)
  return tfds.features.FeaturesDict(spec)


def _batches(source: ImageSource, views: int, aug_seed: int, batch: int
             ) -> Iterator[tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
  """`(ids, view, images, labels)` in record order: view-major, then id."""
  for k in range(views + 1):
    for start in range(0, len(source.ids), batch):
      ids = source.ids[start:start + batch]
      images, labels, _ = zip(*(source.example(int(i), k, aug_seed)
                                for i in ids))
      yield ids, k, np.stack(images), np.asarray(labels, np.int64)


def write_features(out_dir: str, teacher_fn, source: ImageSource, *,
                   views: int, aug_seed: int, batch: int, dtype: str,
                   with_logits: bool, shard_size: int, num_classes: int,
                   extra_meta: dict[str, Any] | None = None,
                   quiet: bool = False) -> dict[str, Any]:
  """Runs `teacher_fn(images) -> (feature, logits)` over every view and
  writes the dataset; returns its metadata (`precompute.json`, with
  `extra_meta` added)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if views and not source.has_augmentation:
    raise PrecomputeError('precompute.views > 0 needs a training '
                          'augmentation (data.augment is "none")')
  version_dir = os.path.join(out_dir, FEATURES_NAME, '1.0.0')
  if os.path.exists(os.path.join(version_dir, 'dataset_info.json')):
    raise PrecomputeError(f'{out_dir} already holds precomputed features')
  os.makedirs(version_dir, exist_ok=True)
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
        name = (f'{FEATURES_NAME}-train.array_record-{s:05d}-of-'
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
          dataset_name=FEATURES_NAME, split='train',
          filetype_suffix='array_record'))
  tfds.folder_dataset.write_metadata(
      data_dir=version_dir, features=spec, split_infos=[split],
      filename_template=_TEMPLATE, check_data=False)
  meta = dict(records=written, examples=len(source.ids), views=views,
              aug_seed=aug_seed, dtype=dtype, logits=with_logits,
              feature_dim=int(spec['feature'].shape[0]),
              seconds=time.time() - t0, **(extra_meta or {}))
  with open(os.path.join(out_dir, 'precompute.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


def open_features(path: str):
  """`(records source, metadata)` of a precompute output directory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(path, 'precompute.json')
  if not os.path.exists(meta_path):
    raise PrecomputeError(f'no precomputed features at {path} (missing '
                          'precompute.json)')
  with open(meta_path) as f:
    meta = json.load(f)
  builder = tfds.builder_from_directory(
      os.path.join(path, FEATURES_NAME, '1.0.0'))
  return builder.as_data_source(split='train'), meta


def run(config, workdir: str, quiet: bool = False) -> dict[str, Any]:
  """Loads the teacher and writes its features for `config.data`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gendd_jax import sharding  # pylint: disable=g-import-not-at-top
  from gendd_jax import train  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise PrecomputeError('run precompute as a single process')
  p = config.precompute
  source = image_source(config)
  info = source.info
  mesh = sharding.mesh_from_config(config.mesh)
  graphdef, variables = train.load_teacher(config, info, mesh)
  model = nnx.merge(graphdef, variables['params'], variables['batch_stats'])
  fwd = jax.jit(lambda x: model(x, train=False))
  meta = write_features(
      workdir, lambda images: fwd(jnp.asarray(images)), source,
      views=int(p.views), aug_seed=int(p.aug_seed),
      batch=int(config.data.eval_batch_size), dtype=str(p.dtype),
      with_logits=bool(p.logits), shard_size=int(p.shard_size),
      num_classes=int(info['num_classes']),
      extra_meta=dict(dataset=config.data.name,
                      teacher=config.teacher.checkpoint), quiet=quiet)
  return meta


def main(argv) -> None:
  from gendd_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  config, workdir = main_lib.config_and_workdir(argv)
  from gendd_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    meta = run(config, workdir)
  except errors.USER_ERRORS as e:
    main_lib.fail(str(e))
  print(f'wrote {meta["records"]} records ({meta["examples"]} examples x '
        f'{meta["views"] + 1} views) to {workdir} in '
        f'{meta["seconds"]:.1f}s', flush=True)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from gendd_jax import main as _main  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=_main._parse_flags)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Reading, for training.
# ---------------------------------------------------------------------------


def train_stream(config, process_index: int = 0, process_count: int = 1):
  """Training batches over the precomputed records of
  `config.teacher.features`, each with its view of the image and the stored
  teacher output (`teacher_feature`, and `teacher_logits` if kept)."""
  from gendd_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  records, meta = open_features(config.teacher.features)
  source = image_source(config)
  known = set(source.ids.tolist())
  missing = [int(r) for r in (records[0]['id'], records[len(records) - 1]['id'])
             if int(r) not in known]
  if missing or meta['examples'] != len(source.ids):
    raise PrecomputeError(
        f'features at {config.teacher.features} were computed for '
        f'{meta["examples"]} examples of {meta.get("dataset")!r}; the '
        f'configured training split has {len(source.ids)}')
  aug_seed = int(meta['aug_seed'])

  def join(record, rng):
    del rng  # The view's randomness is fixed by (aug_seed, id, view).
    example_id, view = int(record['id']), int(record['view'])
    image, label, usable = source.example(example_id, view, aug_seed)
    out = dict(image=np.asarray(image, np.float32),
               id=np.int64(example_id),
               teacher_feature=np.asarray(record['feature'], np.float32))
    if label >= 0:
      out['label'] = np.int32(label)
      out['label_mask'] = np.bool_(usable)
    if 'logits' in record:
      out['teacher_logits'] = np.asarray(record['logits'], np.float32)
    return out

  d = config.data
  read = ip.ReadSettings(
      num_threads=int(d.get('num_threads', 4)),
      prefetch=int(d.get('prefetch', 64)), num_workers=0)
  return ip.TrainStream(records, d.batch_size, config.seed, join,
                        process_index=process_index,
                        process_count=process_count, read=read), meta
