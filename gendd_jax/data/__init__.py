"""The `Dataset` interface and `open_dataset`, which opens `config.data` from
host memory (`memory`) or through grain (`streams`); re-exports the names
other modules use. Below it: `augment`, `builders`, `features`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator

import numpy as np

from gendd_jax.data import memory
from gendd_jax.data import streams
from gendd_jax.data.memory import (  # noqa: F401 (re-exported)
    AVAILABLE, ArraySplit, ArrayStream, TrainBatches, create_splits,
    eval_batches)
from gendd_jax.errors import DataError
from gendd_jax.errors import PipelineError


@dataclasses.dataclass
class Dataset:
  """What the training loop needs from a dataset, whatever its source.

  Attributes:
    info: `num_classes`, `input_shape`, `labelled` and dataset-specific
      entries.
    train: this process's training batches: an iterator with
      `steps_per_epoch`, `get_state()` and `set_state()`.
    eval_batches: `() -> iterator` over the evaluation split, every example
      once, in fixed-shape batches with `valid`/`valid_global` masks, `label`
      and `id`.
    train_eval_batches: the same over the training split in the evaluation
      view (for target statistics); `max_batches` caps the pass.
  """
  info: dict
  train: Any
  eval_batches: Callable[[], Iterator[dict[str, Any]]]
  train_eval_batches: Callable[..., Iterator[dict[str, Any]]]


def open_dataset(d, seed: int, process_index: int = 0,
                 process_count: int = 1) -> Dataset:
  """`config.data` -> a `Dataset`: in-memory for `AVAILABLE` names, else a
  TFDS/builder dataset (`'<kind>:<name>'`) read through grain."""
  if d.name in AVAILABLE:
    parts = memory.open_in_memory(d, seed, process_index, process_count)
  elif ':' not in d.name:
    raise DataError(f'unknown dataset {d.name!r}; available: '
                    f'{", ".join(AVAILABLE)}, or "tfds:<name>" / '
                    '"<kind>:<name>" for prepared TFDS datasets')
  else:
    try:
      parts = streams.open_dataset(d, seed, process_index, process_count)
    except PipelineError as e:
      raise DataError(str(e)) from e
  info, train, test_batches, train_batches = parts

  def capped(max_batches: int | None = None):
    stop = None if max_batches is None else max(0, max_batches)
    return itertools.islice(train_batches(), stop)

  return Dataset(info=info, train=train, eval_batches=test_batches,
                 train_eval_batches=capped)


def open_eval_batches(d, seed: int, process_index: int = 0,
                      process_count: int = 1):
  """`(num_classes or 0, () -> batches)` of `config.data`'s evaluation
  split; a TFDS/builder dataset opens that split alone."""
  if d.name in AVAILABLE or ':' not in d.name:
    ds = open_dataset(d, seed, process_index, process_count)
    return ds.info['num_classes'], ds.eval_batches
  try:
    return streams.open_eval(d, process_index, process_count)
  except PipelineError as e:
    raise DataError(str(e)) from e


# Long-tailed evaluation (ImageNet-LT): a class is many-shot with more than
# MANY_SHOT training images, few-shot with fewer than FEW_SHOT, medium-shot
# otherwise; a group's accuracy is the mean of its classes' accuracies.
MANY_SHOT, FEW_SHOT = 100, 20
SHOT_GROUPS = ('many', 'medium', 'few')


def train_class_counts(d, seed: int, num_classes: int) -> np.ndarray:
  """Training images per class of `config.data` (`[num_classes]`, labelled
  examples only), read from the labels alone."""
  if d.name in AVAILABLE:
    train, _, _ = create_splits(
        d.name, fold=d.fold, num_folds=d.num_folds,
        label_fraction=d.label_fraction, seed=seed,
        data_dir=d.data_dir or None)
    labels = np.asarray(train.labels)[np.asarray(train.label_mask)]
  else:
    try:
      source = streams.open_source(d.name, d.train_split, d.data_dir or None)
    except PipelineError as e:
      raise DataError(str(e)) from e
    labels = np.asarray([int(source[i].get('label', -1))
                         for i in range(len(source))])
    labels = labels[labels >= 0]
  return np.bincount(labels, minlength=num_classes)[:num_classes]


def shot_accuracy(hits: np.ndarray, totals: np.ndarray,
                  train_counts: np.ndarray) -> dict[str, float]:
  """Many/medium/few-shot top-1 (%) from per-class correct and evaluated
  counts; a group with no evaluated class is left out."""
  counts = np.asarray(train_counts)
  group = np.where(counts > MANY_SHOT, 0, np.where(counts < FEW_SHOT, 2, 1))
  seen = np.asarray(totals) > 0
  acc = np.where(seen, np.asarray(hits) / np.maximum(totals, 1), 0.0)
  return {name: float(100.0 * acc[(group == g) & seen].mean())
          for g, name in enumerate(SHOT_GROUPS) if ((group == g) & seen).any()}


def per_class(correct: np.ndarray, labels: np.ndarray, num_classes: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """`(correct per class, examples per class)` of per-example results."""
  labels = np.asarray(labels)
  return (np.bincount(labels, weights=np.asarray(correct, np.float64),
                      minlength=num_classes)[:num_classes],
          np.bincount(labels, minlength=num_classes)[:num_classes])
