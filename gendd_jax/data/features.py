"""Precomputed teacher features, the reading side: the training images in
any view (`image_source`), the stored records (`open_features`) and the
training stream joining the two (`train_stream`).

`python -m gendd_jax.cli.precompute` writes a TFDS dataset (`array_record`)
of records `{id, view, feature, label[, logits]}` under
`<dir>/FEATURES_NAME/1.0.0`, and `<dir>/precompute.json`:

* view 0 is the deterministic evaluation view of every example;
* views 1..K (`precompute.views = K`) are training augmentations, view `k` of
  example `id` drawn with `np.random.default_rng((aug_seed, id, k))`
  (`aug_seed` recorded), so the student sees exactly the teacher's image.

Training reads it with `config.teacher.source = 'precomputed'` and
`config.teacher.features = <dir>`: the stream runs over the records (each
epoch visits every (id, view) once), rebuilds each record's view of the image
and takes the stored feature as the teacher's, so the teacher forward is
skipped (the teacher checkpoint still provides the classifier `W_cls`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from gendd_jax import paths
from gendd_jax.data import augment
from gendd_jax.data import memory
from gendd_jax.data import streams
from gendd_jax.errors import PrecomputeError

FEATURES_NAME = 'gendd_teacher_features'


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
  train, _, info = memory.create_splits(
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
      image = augment.pad_crop_flip(image[None], rng, fill=fill)[0]
    return image, int(train.labels[p]), bool(train.label_mask[p])

  return ImageSource(ids=train.index.astype(np.int64), example=example,
                     has_augmentation=d.augment != 'none', info=info)


def grain_source(d) -> ImageSource:
  """The training split of a TFDS/builder dataset."""
  src = streams.open_source(d.name, d.train_split, d.data_dir or None)
  train_view = augment.train_transform(
      d.augment, d.image_size, crop_scale=float(d.get('crop_scale', 0.6)))
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

  info = dict(num_classes=int(d.num_classes) or
              streams.source_num_classes(src),
              input_shape=(d.image_size, d.image_size, 3))
  return ImageSource(ids=np.arange(len(src), dtype=np.int64),
                     example=example, has_augmentation=d.augment != 'none',
                     info=info)


def image_source(config) -> ImageSource:
  """The training split of `config.data`, in any view."""
  d = config.data
  if d.name in memory.AVAILABLE:
    return in_memory_source(d, config.seed)
  return grain_source(d)


def open_features(path: str):
  """`(records source, metadata)` of a precompute output directory."""
  path = paths.absolute(path)
  meta_path = os.path.join(path, 'precompute.json')
  if not paths.exists(meta_path):
    raise PrecomputeError(f'no precomputed features at {path} (missing '
                          'precompute.json)')
  meta = json.loads(paths.read_text(meta_path))
  builder = tfds.builder_from_directory(os.path.join(
      paths.local_copy(path, FEATURES_NAME), FEATURES_NAME, '1.0.0'))
  return builder.as_data_source(split='train'), meta


def train_stream(config, process_index: int = 0, process_count: int = 1):
  """Training batches over the precomputed records of
  `config.teacher.features`, each with its view of the image and the stored
  teacher output (`teacher_feature`, and `teacher_logits` if kept). Label
  smoothing applies as on the streaming path; mixup and cutmix are refused
  earlier (`settings.precomputed_teacher`): they would pair mixed images
  with unmixed teacher outputs."""
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
  read = streams.ReadSettings(
      num_threads=int(d.get('num_threads', 4)),
      prefetch=int(d.get('prefetch', 64)), num_workers=0)
  smoothing = streams.mix_transform(d, source.info['num_classes'])
  return streams.TrainStream(records, d.batch_size, config.seed, join,
                             smoothing, process_index=process_index,
                             process_count=process_count, read=read), meta
