"""In-memory datasets (digits, digits32, CIFAR), the digits folds, and their
deterministic batching (`TrainBatches`, `ArrayStream`, `eval_batches`).

The bundled example uses scikit-learn's handwritten digits (1,797 real 8x8
images shipped inside the package, so nothing is downloaded). CIFAR-10/100
come from TFDS (prepared beforehand in `data.data_dir`; nothing is downloaded
at run time) and are held in host memory. Batches, and their augmentation,
are a pure function of `(seed, step)`: a resumed run sees exactly the stream
an uninterrupted run would, with no iterator state to save.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from typing import Iterator

import numpy as np
from gendd_jax import paths
from gendd_jax.data import augment
from gendd_jax.errors import DataError

AVAILABLE = ('digits', 'digits32', 'cifar10', 'cifar100')
AUGMENTATIONS = ('none', 'cifar')


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """One split held in host memory.

  Attributes:
    images: `[N, ...]` float32.
    labels: `[N]` int32 class ids.
    label_mask: `[N]` bool, True where a student stage may use the label.
    index: `[N]` int64 ids of the examples in the full dataset.
  """
  images: np.ndarray
  labels: np.ndarray
  label_mask: np.ndarray
  index: np.ndarray

  def __len__(self) -> int:
    return self.images.shape[0]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as `([1797, 64] float32 in [0, 1], [1797] int32)`.

  Read straight from the CSV file scikit-learn ships (importing scikit-learn
  itself takes seconds); `tests/test_digits_data.py` checks it equals
  `sklearn.datasets.load_digits()`.
  """
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('the digits dataset comes with scikit-learn: pip install '
                    'scikit-learn')
  path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data',
                      'digits.csv.gz')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',')
  return ((table[:, :-1].astype(np.float32) / 16.0),
          table[:, -1].astype(np.int32))


def digits_as_rgb32(images: np.ndarray) -> np.ndarray:
  """`[N, 64]` digits -> `[N, 32, 32, 3]` (each pixel a 4x4 block, grey
  in three channels, centred to [-1, 1]): CIFAR-sized inputs for the CIFAR
  architectures, for experiments that need them without a download."""
  x = images.reshape(-1, 8, 8)
  x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
  return np.repeat(x[..., None] * 2.0 - 1.0, 3, axis=-1).astype(np.float32)


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Stratified k-fold `(train_idx, test_idx)` pairs; every example is tested
  exactly once over the folds.

  The folds of scikit-learn's `StratifiedKFold(num_folds, shuffle=True,
  random_state=seed)` (checked equal in `tests/test_digits_data.py`), without
  importing scikit-learn: classes are numbered by first appearance; the
  sorted class codes are dealt round-robin to the folds, which fixes how
  many examples of each class every fold tests; each class's list of fold
  numbers is then shuffled by one `RandomState(seed)`, class by class.
  """
  if num_folds < 2:
    raise DataError(f'data.num_folds must be >= 2, got {num_folds}')
  labels = np.asarray(labels)
  _, first, inverse = np.unique(labels, return_index=True,
                                return_inverse=True)
  by_appearance = np.argsort(np.argsort(first))[inverse]
  num_classes = len(first)
  dealt = np.sort(by_appearance)
  per_fold = np.stack([np.bincount(dealt[i::num_folds],
                                   minlength=num_classes)
                       for i in range(num_folds)])
  rng = np.random.RandomState(seed)
  test_fold = np.empty(len(labels), np.int64)
  for k in range(num_classes):
    folds = np.repeat(np.arange(num_folds), per_fold[:, k])
    rng.shuffle(folds)
    test_fold[by_appearance == k] = folds
  every = np.arange(len(labels))
  return [(every[test_fold != i], every[test_fold == i])
          for i in range(num_folds)]


def few_label_mask(labels: np.ndarray, fraction: float, seed: int
                   ) -> np.ndarray:
  """Marks a class-stratified `fraction` of examples as labelled (>= 1 each)."""
  if not 0.0 < fraction <= 1.0:
    raise DataError(f'data.label_fraction must be in (0, 1], got {fraction}')
  mask = np.zeros(len(labels), bool)
  if fraction == 1.0:
    mask[:] = True
    return mask
  rng = np.random.default_rng(seed)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    n = max(1, int(round(fraction * len(idx))))
    mask[rng.choice(idx, size=n, replace=False)] = True
  return mask


def load_tfds_arrays(name: str, split: str, data_dir: str | None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A prepared TFDS image dataset as `(uint8 [N, H, W, C], int32 [N])`."""
  import tensorflow_datasets as tfds  # Lazy: only these datasets need it.
  data_dir = paths.expand(data_dir)
  where = data_dir or '(default ~/tensorflow_datasets)'
  not_prepared = DataError(
      f'TFDS dataset {name!r} is not prepared in data_dir {where}; prepare '
      f'it once where the internet is reachable (`tfds build {name} '
      '--data_dir <dir>`, or `python -m gendd_jax.cli.build_dataset tfds '
      f'--name {name} --data_dir <dir>`) and pass '
      '--config.data.data_dir=<dir>')
  if data_dir and not paths.isdir(os.path.join(data_dir, name)):
    raise not_prepared
  if data_dir and paths.is_remote(data_dir):
    data_dir = paths.local_copy(data_dir, name)  # TF's reader: local only.
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      # As `build_dataset tfds` prepares it; `as_dataset` cannot read it.
      source = builder.as_data_source(split=split)
      n = len(source)
      ds = ({k: np.stack([r[k] for r in rows]) for k in ('image', 'label')}
            for rows in (source.__getitems__(range(i, min(i + 1024, n)))
                         for i in range(0, n, 1024)))
    else:
      ds = tfds.as_numpy(builder.as_dataset(split=split, batch_size=1024,
                                            shuffle_files=False))
  except Exception as e:  # pylint: disable=broad-except
    try:
      prepared = builder.is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = True  # Not the cause we can name; report the original.
    if not prepared:
      raise not_prepared from e
    raise DataError(f'cannot read TFDS dataset {name!r} split {split!r} in '
                    f'data_dir {where}: {type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}') from e
  images, labels = [], []
  for batch in ds:
    images.append(np.asarray(batch['image'], np.uint8))
    labels.append(np.asarray(batch['label'], np.int32))
  if not images:
    raise DataError(f'TFDS dataset {name!r} split {split!r} is empty')
  return np.concatenate(images), np.concatenate(labels)


def normalise_cifar(name: str, images: np.ndarray) -> np.ndarray:
  """uint8 `[N, 32, 32, 3]` -> float32, standardised per channel."""
  mean = np.asarray(augment.CIFAR_MEAN[name], np.float32)
  std = np.asarray(augment.CIFAR_STD[name], np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


def _cifar_splits(name: str, data_dir: str | None, label_fraction: float,
                  seed: int) -> tuple[ArraySplit, ArraySplit, dict]:
  """The official train/test splits (no folds)."""
  tr_img, tr_lab = load_tfds_arrays(name, 'train', data_dir)
  te_img, te_lab = load_tfds_arrays(name, 'test', data_dir)
  num_classes = 10 if name == 'cifar10' else 100
  mask = few_label_mask(tr_lab, label_fraction, seed)
  train = ArraySplit(normalise_cifar(name, tr_img), tr_lab, mask,
                     np.arange(len(tr_lab), dtype=np.int64))
  test = ArraySplit(normalise_cifar(name, te_img), te_lab,
                    np.ones(len(te_lab), bool),
                    np.arange(len(te_lab), dtype=np.int64))
  black = normalise_cifar(name, np.zeros((1, 1, 1, 3), np.uint8))
  info = dict(num_classes=num_classes, input_shape=tuple(tr_img.shape[1:]),
              num_examples=len(tr_lab) + len(te_lab),
              black=tuple(float(v) for v in black.ravel()))
  return train, test, info


def create_splits(name: str, *, fold: int, num_folds: int, label_fraction:
                  float, seed: int, data_dir: str | None = None
                  ) -> tuple[ArraySplit, ArraySplit, dict]:
  """Train/test splits of fold `fold` and the dataset's info.

  For digits, the fold assignment depends on `seed`, as does the labelled
  subset, so different seeds give independent repetitions of the whole
  protocol. CIFAR uses its official train/test splits (`fold` and
  `num_folds` are ignored).
  """
  if name not in AVAILABLE:
    raise DataError(f'unknown dataset {name!r}; available: '
                    f'{", ".join(AVAILABLE)}')
  if name.startswith('cifar'):
    return _cifar_splits(name, data_dir, label_fraction, seed)
  images, labels = load_digits()
  if name == 'digits32':
    images = digits_as_rgb32(images)
  folds = stratified_folds(labels, num_folds, seed)
  if not 0 <= fold < num_folds:
    raise DataError(f'data.fold must be in [0, {num_folds}), got {fold}')
  tr, te = folds[fold]
  mask = few_label_mask(labels[tr], label_fraction, seed + 1000 * fold)
  train = ArraySplit(images[tr], labels[tr], mask, tr.astype(np.int64))
  test = ArraySplit(images[te], labels[te], np.ones(len(te), bool),
                    te.astype(np.int64))
  info = dict(num_classes=int(labels.max()) + 1,
              input_shape=tuple(images.shape[1:]), num_examples=len(labels))
  return train, test, info


class TrainBatches:
  """Shuffled, drop-remainder batches as a pure function of the step.

  Each process gets its contiguous slice of the global batch, ready for
  `jax.make_array_from_process_local_data`.
  """

  def __init__(self, split: ArraySplit, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               augment: str = 'none', fill=0.0):
    if augment not in AUGMENTATIONS:
      raise DataError(f'unknown augmentation {augment!r}; available: '
                      f'{", ".join(AUGMENTATIONS)}')
    if augment == 'cifar' and (split.images.ndim != 4 or
                               split.images.shape[-1] != 3):
      raise DataError("augmentation 'cifar' needs [N, H, W, 3] images, got "
                      f'{split.images.shape}')
    self.augment = augment
    self.fill = fill
    if global_batch < 1:
      raise DataError(f'batch size must be positive, got {global_batch}')
    if global_batch % process_count:
      raise DataError(f'batch size {global_batch} is not divisible by the '
                      f'{process_count} processes')
    if global_batch > len(split):
      raise DataError(f'batch size {global_batch} exceeds the {len(split)} '
                      'training examples')
    self.split = split
    self.global_batch = global_batch
    self.seed = seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.steps_per_epoch = len(split) // global_batch
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.random.default_rng((self.seed, epoch)).permutation(
          len(self.split))
      self._perm_epoch = epoch
    return self._perm

  def indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = self._permutation(epoch)
    start = i * self.global_batch + self.offset
    return perm[start:start + self.local]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    s = self.split
    images = s.images[idx]
    if self.augment == 'cifar':
      # Global step and process slice: every process draws its own part of
      # one deterministic global stream.
      rng = np.random.default_rng((self.seed, step, self.offset, 1))
      images = augment.pad_crop_flip(images, rng, fill=self.fill)
    return dict(image=images, label=s.labels[idx],
                label_mask=s.label_mask[idx])


def eval_batches(split: ArraySplit, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches covering every example once; padding has valid=0."""
  if global_batch < 1:
    raise DataError(f'eval batch size must be positive, got {global_batch}')
  n = len(split)
  local = global_batch // process_count
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)
    valid = idx < n
    part = slice(process_index * local, (process_index + 1) * local)
    local_idx = np.where(valid, idx, 0)[part]
    yield dict(image=split.images[local_idx], label=split.labels[local_idx],
               id=split.index[local_idx],
               valid=valid[part].astype(np.float32),
               valid_global=valid.astype(np.float32))


class ArrayStream:
  """`TrainBatches` as a resumable iterator (the state is the step)."""

  def __init__(self, batches: TrainBatches):
    self.batches = batches
    self.steps_per_epoch = batches.steps_per_epoch
    self.step = 0

  def __iter__(self) -> 'ArrayStream':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batches.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict[str, int]:
    return {'step': self.step}

  def set_state(self, state) -> None:
    if set(state) != {'step'}:
      raise DataError(f'saved data state {state} does not fit an in-memory '
                      'dataset (was the run started with other data '
                      'settings?)')
    self.step = int(state['step'])


def open_in_memory(d, seed: int, process_index: int = 0,
                   process_count: int = 1):
  """The parts of a `data.Dataset` for an in-memory dataset (`AVAILABLE`):
  `(info, train stream, () -> test batches, () -> train batches)`."""
  train, test, info = create_splits(
      d.name, fold=d.fold, num_folds=d.num_folds,
      label_fraction=d.label_fraction, seed=seed,
      data_dir=d.data_dir or None)
  info = dict(info, labelled=True)
  batches = TrainBatches(train, d.batch_size, seed, process_index,
                         process_count, augment=d.augment,
                         fill=info.get('black', 0.0))

  def over(split):
    return lambda: eval_batches(split, d.eval_batch_size, process_index,
                                process_count)
  return info, ArrayStream(batches), over(test), over(train)
