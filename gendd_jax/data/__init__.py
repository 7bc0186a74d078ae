"""The `Dataset` interface and `open_dataset`, which opens `config.data` from
host memory (`memory`) or through grain (`streams`); re-exports the names
other modules use. Below it: `augment`, `builders`, `features`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator

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
