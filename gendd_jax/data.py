"""In-memory datasets, deterministic batching and the digits protocol.

The bundled example uses scikit-learn's handwritten digits (1,797 real 8x8
images shipped inside the package, so nothing is downloaded). Batches are a
pure function of `(seed, step)`: a resumed run sees exactly the stream an
uninterrupted run would, with no iterator state to save.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

AVAILABLE = ('digits',)


class DataError(ValueError):
  """A dataset cannot be built from the given settings."""


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
  """scikit-learn's digits as `([1797, 64] float32 in [0, 1], [1797] int32)`."""
  from sklearn import datasets  # Imported lazily: only this dataset needs it.
  d = datasets.load_digits()
  return (d.data.astype(np.float32) / 16.0), d.target.astype(np.int32)


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Stratified k-fold `(train_idx, test_idx)` pairs; every example is tested
  exactly once over the folds."""
  from sklearn.model_selection import StratifiedKFold
  if num_folds < 2:
    raise DataError(f'data.num_folds must be >= 2, got {num_folds}')
  skf = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  return [(np.sort(a), np.sort(b))
          for a, b in skf.split(np.zeros(len(labels)), labels)]


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


def create_splits(name: str, *, fold: int, num_folds: int, label_fraction:
                  float, seed: int) -> tuple[ArraySplit, ArraySplit, dict]:
  """Train/test splits of fold `fold` and the dataset's info.

  The fold assignment depends on `seed`, as does the labelled subset, so
  different seeds give independent repetitions of the whole protocol.
  """
  if name != 'digits':
    raise DataError(f'unknown dataset {name!r}; available: '
                    f'{", ".join(AVAILABLE)}')
  images, labels = load_digits()
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
               process_index: int = 0, process_count: int = 1):
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
    return dict(image=s.images[idx], label=s.labels[idx],
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
               valid=valid[part].astype(np.float32),
               valid_global=valid.astype(np.float32))
