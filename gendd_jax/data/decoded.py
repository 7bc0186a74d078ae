"""TFDS/builder training splits small enough to hold decoded in host memory
(`data.in_memory_limit_mb`): decoded once, when training first reads them
(`streams.ChosenStream`), then served from memory.

`DecodedStream` yields exactly the batches of `streams.TrainStream` with
`num_workers=0`, bit for bit:

* the same order: grain's per-epoch shuffle of this process's records
  `p::P` (its `index_shuffle` with seed `seed + epoch`);
* the same per-example randomness: grain's `random_map` generator,
  Philox(seed + 1) at counter `[0, 0, 0, position in the stream]`;
* the same batch randomness (mixup/cutmix): Philox(seed + 2) at the batch
  number;
* the same records skipped (images that cannot be decoded);
* an iterator state of grain's own form (`{'next_index': position}`,
  wrapped as `{'parent': ..., 'index_for_rng': batches}` when a batch
  transform follows), so a run resumes across the two paths.

What changes is the cost. Images are decoded once, and what a view does
deterministically is done once:

* 'none' (the evaluation view): the resized, centre-cropped uint8 view is
  stored; a batch is a gather and one vectorised normalisation.
* 'cifar': images are stored at the training size; a batch draws each
  example's offsets and flip from its own generator, then pads, crops and
  flips the whole batch in one gather.
* 'regular', 'rand': the view's Pillow operations still run per example,
  on the stored decoded image (their pixels are Pillow's resampling).

Worker processes (`data.num_workers`) are not used: the stream is the one
of the streaming path without them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

# grain's own shuffle function (what `MapDataset.shuffle` calls), here on a
# whole epoch at once; `tests/test_decoded.py` checks the streams are equal.
from grain._src.python.experimental.index_shuffle.python import (
    index_shuffle_module as index_shuffle)
import numpy as np

from gendd_jax.data import augment
from gendd_jax.errors import CorruptImageError
from gendd_jax.errors import PipelineError

MB = 1 << 20
# Records read from the source per call while decoding.
_CHUNK = 256
# Bytes held per example beside its image: id (int64) and label (int32).
_PER_EXAMPLE = 12


@dataclasses.dataclass
class DecodedSlice:
  """One process's slice `p::P` of a training split, decoded.

  Attributes:
    images: `[S]` uint8 `[H, W, 3]` arrays (None where undecodable).
    ids: `[S]` int64 example ids.
    labels: `[S]` int32 labels, or None for unlabelled data.
    good: `[S]` bool, False where the image could not be decoded.
    nbytes: decoded size held (images, ids and labels).
  """
  images: list[np.ndarray | None]
  ids: np.ndarray
  labels: np.ndarray | None
  good: np.ndarray
  nbytes: int


def _records(source, indices: Sequence[int]) -> list[Mapping[str, Any]]:
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    return list(getitems(list(indices)))
  return [source[i] for i in indices]


def _decoded(record: Mapping[str, Any]) -> np.ndarray:
  image = record['image']
  if isinstance(image, (bytes, np.bytes_)):
    return augment.decode(bytes(image))
  return np.asarray(image)


def decode_slice(source, limit_bytes: int, process_index: int = 0,
                 process_count: int = 1, skipped=None
                 ) -> tuple[DecodedSlice | None, int]:
  """Decodes this process's records `p::P` of `source` if they fit.

  The size is estimated from the first record first, then counted while
  decoding; decoding stops as soon as the count passes the limit.

  Args:
    source: random-access records (`len`, `[i]`) holding `image` (encoded
      bytes or uint8 pixels) and optionally `id`, `label`.
    limit_bytes: the most decoded bytes to hold.
    process_index, process_count: this process's slice.
    skipped: a `streams.SkipCounter` for undecodable images.

  Returns:
    `(slice, decoded bytes)` under the limit; `(None, estimated decoded
    bytes)` over it.
  """
  n = len(source)
  positions = range(process_index, n, process_count)
  size = len(positions)
  if not size:
    return None, 0
  first = _records(source, positions[:1])[0]
  try:
    per_image = _decoded(first).nbytes + _PER_EXAMPLE
  except CorruptImageError:
    per_image = _PER_EXAMPLE
  if per_image * size > limit_bytes:
    return None, per_image * size
  labelled = 'label' in first
  images: list[np.ndarray | None] = []
  ids = np.empty(size, np.int64)
  labels = np.zeros(size, np.int32) if labelled else None
  good = np.ones(size, bool)
  total = 0
  for start in range(0, size, _CHUNK):
    chunk = positions[start:start + _CHUNK]
    for j, (index, record) in enumerate(zip(chunk, _records(source, chunk)),
                                        start):
      ids[j] = record.get('id', index)
      if labelled:
        labels[j] = record['label']
      try:
        image = _decoded(record)
      except CorruptImageError:
        good[j] = False
        images.append(None)
        if skipped is not None:
          skipped.add(str(record.get('file_name', index)))
        continue
      images.append(image)
      total += image.nbytes + _PER_EXAMPLE
    if total > limit_bytes:
      done = start + len(chunk)
      return None, total * size // done
  if not good.any():
    raise PipelineError(f'none of the {size} training images of this '
                        'process can be decoded')
  return DecodedSlice(images, ids, labels, good, total), total


def _reset_rng(rng: np.random.Generator, index: int) -> np.random.Generator:
  """`rng` (a Philox generator) moved to the stream of element `index`, as
  grain's `random_map` moves its generator for every element."""
  state = rng.bit_generator.state
  state['state']['counter'] = np.array([0, 0, 0, index], dtype=np.uint64)
  state['buffer'] = np.array([0, 0, 0, 0], dtype=np.uint64)
  state['buffer_pos'] = 4
  state['has_uint32'] = 0
  state['uinteger'] = 0
  rng.bit_generator.state = state
  return rng


def _philox(seed: int) -> np.random.Generator:
  return np.random.Generator(np.random.Philox(seed))


class DecodedStream:
  """The training batches of one process, served from a `DecodedSlice`:
  the stream of `streams.TrainStream` (see the module docstring).

  Args:
    data: this process's decoded records.
    num_records: records in the whole split (over all processes).
    global_batch: examples per step over all processes.
    seed: the training stream's seed.
    view: the training view (`augment.train_transform`), applied to uint8
      `[H, W, 3]` with the example's generator.
    batch_fn: optional batch, rng -> batch (mixup/cutmix).
    process_index, process_count: this process's slice.
  """

  def __init__(self, data: DecodedSlice, num_records: int, global_batch: int,
               seed: int, view: Callable[..., np.ndarray],
               batch_fn: Callable | None = None, *, process_index: int = 0,
               process_count: int = 1):
    if global_batch < 1 or global_batch % process_count:
      raise PipelineError(f'batch size {global_batch} must be positive and '
                          f'divisible by the {process_count} processes')
    self.local_batch = global_batch // process_count
    smallest = num_records // process_count
    if smallest < self.local_batch:
      raise PipelineError(
          f'each of the {process_count} process(es) holds at least '
          f'{smallest} of the {num_records} training examples, fewer than '
          f'its batch of {self.local_batch}')
    self.steps_per_epoch = smallest // self.local_batch
    self.shard_size = len(data.ids)
    self._data = data
    self._view = view
    self._batch_fn = batch_fn
    self._seed = seed
    self._perm_epoch, self._perm = -1, None
    self._example_rng = _philox(seed + 1)
    self._batch_rng = _philox(seed + 2)
    self.position = 0  # Records of the stream consumed (skipped included).
    self.batches = 0
    self._kind, self._stored = self._prepare(view)

  def _prepare(self, view) -> tuple[str, np.ndarray | None]:
    """What the view does deterministically, done once: 'eval' stores the
    uint8 evaluation view, 'cifar' the images at the training size; 'each'
    runs the view per example."""
    if isinstance(view, augment.EvalView):
      kind, fixed = 'eval', dataclasses.replace(view, as_uint8=True)
    elif isinstance(view, augment.TrainView) and view.kind == 'cifar':
      # As `TrainView` brings an image of another size to the training size.
      size = view.image_size
      kind, fixed = 'cifar', augment.EvalView(size, size, as_uint8=True)
    else:
      return 'each', None
    stored = [None if img is None
              else img if kind == 'cifar' and img.shape[:2] == (size, size)
              else fixed(img) for img in self._data.images]
    shape = next(s.shape for s in stored if s is not None)
    blank = np.zeros(shape, np.uint8)  # Never read: its record is skipped.
    self._data.images = []  # The stored views replace the decoded images.
    return kind, np.stack([s if s is not None else blank for s in stored])

  def _permutation(self, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order of this process's records (local indices), as
    grain's `shuffle` of the slice `p::P` gives it."""
    if self._perm_epoch != epoch:
      last = self.shard_size - 1
      seed = (self._seed + epoch) % 2 ** 32
      self._perm = np.fromiter(
          (index_shuffle.index_shuffle(j, max_index=last, seed=seed, rounds=4)
           for j in range(self.shard_size)), np.int64, self.shard_size)
      self._perm_epoch = epoch
    return self._perm

  def _next_examples(self) -> tuple[np.ndarray, np.ndarray]:
    """`(local indices, stream positions)` of the next batch: the next
    `local_batch` decodable records of the stream."""
    idx, pos = [], []
    need = self.local_batch
    while need:
      # `need` positions hold at most `need` usable records, so the batch
      # never reads past its last record (grain's state counts the same).
      ks = np.arange(self.position, self.position + need)
      epochs, js = np.divmod(ks, self.shard_size)
      local = np.empty(need, np.int64)
      for epoch in np.unique(epochs):
        at = epochs == epoch
        local[at] = self._permutation(int(epoch))[js[at]]
      ok = self._data.good[local]
      idx.append(local[ok])
      pos.append(ks[ok])
      self.position += need
      need -= int(ok.sum())
    return np.concatenate(idx), np.concatenate(pos)

  def _images(self, idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    view = self._view
    rng = self._example_rng
    if self._kind == 'each':
      return np.stack([
          np.asarray(view(self._data.images[i], _reset_rng(rng, int(k))),
                     np.float32) for i, k in zip(idx, pos)])
    images = self._stored[idx]
    if self._kind == 'cifar':
      draws = [augment.pad_crop_flip_draws(_reset_rng(rng, int(k)), 1)
               for k in pos]
      dy, dx, flip = (np.concatenate(d) for d in zip(*draws))
      images = augment.apply_pad_crop_flip(images, dy, dx, flip)
    if view.as_uint8:
      return images.astype(np.float32)
    return augment.normalise(images, view.mean, view.std)

  def __iter__(self) -> 'DecodedStream':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    idx, pos = self._next_examples()
    d = self._data
    out = {'image': self._images(idx, pos), 'id': d.ids[idx]}
    if d.labels is not None:
      out['label'] = d.labels[idx]
      out['label_mask'] = np.ones(len(idx), bool)
    if self._batch_fn is not None:
      out = self._batch_fn(out, _reset_rng(self._batch_rng, self.batches))
    self.batches += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """grain's state of the same stream (see the module docstring)."""
    state = {'next_index': self.position}
    if self._batch_fn is None:
      return state
    return {'parent': state, 'index_for_rng': self.batches}

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = dict(state)
    try:
      if self._batch_fn is None:
        if set(state) != {'next_index'}:
          raise KeyError(sorted(state))
        position, batches = int(state['next_index']), 0
      else:
        if set(state) != {'parent', 'index_for_rng'}:
          raise KeyError(sorted(state))
        if set(state['parent']) != {'next_index'}:
          raise KeyError(sorted(state['parent']))
        position = int(state['parent']['next_index'])
        batches = int(state['index_for_rng'])
      if position < 0 or batches < 0:
        raise ValueError('negative position')
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise PipelineError(
          'the saved data-iterator state does not fit this pipeline (was the '
          'run started with other data settings, or with data.num_workers '
          '> 0 and the training split streamed? Worker processes change the '
          'stream, and the in-memory path has none: resume with '
          f'data.in_memory_limit_mb=0): {state}') from e
    self.position, self.batches = position, batches
