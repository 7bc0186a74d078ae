"""grain input pipelines over random-access sources (TFDS `array_record`),
and the TFDS/builder datasets (`data.name = '<kind>:<name>'`) read by them.

Training stream, per process:

  source[p::P] -> shuffle(seed), reshuffled every epoch -> decode + augment
  (per-example rng from (seed, index)) -> skip undecodable images ->
  batch(local) -> batch transform (mixup/cutmix, label smoothing)

When the process's slice decoded is smaller than `data.in_memory_limit_mb`,
it is decoded once, when the stream is first used, and the same stream, bit
for bit and with the same iterator state, is served from memory
(`decoded.DecodedStream`, chosen by `ChosenStream`).

Process `p` of `P` reads only its own slice of the records (every example once
per epoch over all processes); its batches are the `p`-th slices of the
global batch, assembled on device with `jax.make_array_from_process_local_data`
(`sharding.shard_batch`). The stream is a pure function of the seed and the
process count, and the iterator state (`get_state`/`set_state`, a small
JSON-able dict) is saved with every checkpoint, so a resumed run continues
the exact example stream.

Evaluation reads every example exactly once: global batches of fixed shape,
padded at the end with `valid = 0` rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from gendd_jax import paths
from gendd_jax.data import augment
from gendd_jax.data import builders
from gendd_jax.data import decoded
from gendd_jax.errors import BuildError
from gendd_jax.errors import CorruptImageError
from gendd_jax.errors import PipelineError

Example = dict[str, Any]
# The default of `data.in_memory_limit_mb`: training splits whose decoded
# slice (per process) is smaller are decoded once and served from memory.
DEFAULT_IN_MEMORY_LIMIT_MB = 2048.0
# (raw record, rng) -> example dict, or None to skip the record.
ExampleFn = Callable[[Mapping[str, Any], np.random.Generator],
                     'Example | None']
# (batch dict, rng) -> batch dict.
BatchFn = Callable[[Example, np.random.Generator], Example]


@dataclasses.dataclass(frozen=True)
class ReadSettings:
  """How much host parallelism the pipeline uses.

  Attributes:
    num_threads: threads reading and transforming records.
    prefetch: examples buffered ahead of the consumer.
    num_workers: separate worker processes (0: none). Changing it changes
      the order of the stream, so a run must resume with the same value.
  """
  num_threads: int = 8
  prefetch: int = 256
  num_workers: int = 0


def _with_index(index: int, record: Mapping[str, Any]) -> dict[str, Any]:
  """Adds the record's position in the source as `_index` (its example id
  when the source has none of its own)."""
  out = dict(record)
  out['_index'] = index
  return out


class _Indexer:
  """`_with_index` modulo the source length (grain passes the indices of a
  repeated dataset through unchanged); a class, so worker processes can
  pickle it."""

  def __init__(self, n: int):
    self.n = n

  def __call__(self, index: int, record: Mapping[str, Any]):
    return _with_index(index % self.n, record)


def _stack(examples: Sequence[Example]) -> Example:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class SkipCounter:
  """Counts records an example function rejected (e.g. corrupt images)."""

  def __init__(self, what: str = 'records'):
    self.what = what
    self.count = 0
    self.first: list[str] = []

  def add(self, name: str) -> None:
    self.count += 1
    if len(self.first) < 5:
      self.first.append(name)
    if self.count in (1, 10, 100, 1000) or self.count % 10000 == 0:
      logging.warning('skipped %d %s so far (first: %s)', self.count,
                      self.what, ', '.join(self.first))


class TrainStream:
  """The training batches of one process, as a resumable iterator.

  Args:
    source: random-access records (`len`, `__getitem__`), e.g.
      `tfds.data_source(...)`.
    global_batch: examples per step over all processes.
    seed: seeds shuffling and every per-example random choice.
    example_fn: record, rng -> example dict (decode + augment), or None to
      skip the record. The record carries its source position as `_index`.
    batch_fn: optional batch, rng -> batch (mixup/cutmix).
    process_index, process_count: this process's slice of the records.
    read: threads, prefetch and worker processes.
  """

  def __init__(self, source, global_batch: int, seed: int,
               example_fn: ExampleFn, batch_fn: BatchFn | None = None, *,
               process_index: int = 0, process_count: int = 1,
               read: ReadSettings = ReadSettings()):
    if global_batch < 1 or global_batch % process_count:
      raise PipelineError(f'batch size {global_batch} must be positive and '
                          f'divisible by the {process_count} processes')
    n = len(source)
    self.local_batch = global_batch // process_count
    self.shard_size = len(range(process_index, n, process_count))
    # Counted from the smallest shard, so every process runs the same steps.
    smallest = n // process_count
    if smallest < self.local_batch:
      raise PipelineError(
          f'each of the {process_count} process(es) holds at least '
          f'{smallest} of the {n} training examples, fewer than its batch '
          f'of {self.local_batch}')
    self.steps_per_epoch = smallest // self.local_batch
    ds = grain.MapDataset.source(source).map_with_index(_Indexer(n))
    ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(example_fn, seed=seed + 1)
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read.num_threads, prefetch_buffer_size=read.prefetch))
    it = it.batch(self.local_batch, drop_remainder=True, batch_fn=_stack)
    if batch_fn is not None:
      it = it.random_map(batch_fn, seed=seed + 2)
    if read.num_workers:
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=read.num_workers))
    self._dataset = it
    self._iter = None

  def __iter__(self) -> 'TrainStream':
    return self

  def __next__(self) -> Example:
    if self._iter is None:
      self._iter = iter(self._dataset)
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    if self._iter is None:
      self._iter = iter(self._dataset)
    return self._iter.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    if self._iter is None:
      self._iter = iter(self._dataset)
    try:
      self._iter.set_state(dict(state))
    except (ValueError, KeyError, TypeError) as e:
      raise PipelineError(
          f'the saved data-iterator state does not fit this pipeline (was '
          f'the run started with other data settings?): {e}') from e


def eval_batches(source, global_batch: int, example_fn: ExampleFn, *,
                 process_index: int = 0, process_count: int = 1,
                 read: ReadSettings = ReadSettings()
                 ) -> Iterator[Example]:
  """Fixed-shape batches covering every record once, in order.

  Each yielded dict holds this process's slice of one global batch plus
  `valid` (its rows) and `valid_global` (all rows): padding rows, and
  records `example_fn` rejects, have valid 0.
  """
  n = len(source)
  if global_batch < 1 or global_batch % process_count:
    raise PipelineError(f'eval batch size {global_batch} must be positive '
                        f'and divisible by the {process_count} processes')
  local = global_batch // process_count
  num_batches = -(-n // global_batch)
  rng = np.random.default_rng(0)  # Evaluation views are deterministic.

  def load(index: int) -> Example | None:
    if index >= n:
      return None
    return example_fn(_with_index(index, source[index]), rng)

  template: list[Example] = []

  def make_batch(b: int) -> Example:
    ids = np.arange(b * global_batch, (b + 1) * global_batch)
    examples = [load(int(i)) for i in ids]
    valid = np.array([e is not None for e in examples], np.float32)
    if not template:
      first = next((e for e in examples if e is not None), None)
      if first is None:
        raise PipelineError('no decodable example in an evaluation batch')
      template.append({k: np.zeros_like(v) for k, v in first.items()})
    examples = [e if e is not None else template[0] for e in examples]
    part = slice(process_index * local, (process_index + 1) * local)
    out = _stack(examples[part])
    out['valid'] = valid[part]
    out['valid_global'] = valid
    out.setdefault('id', ids[part].astype(np.int64))
    return out

  ds = grain.MapDataset.range(num_batches).map(make_batch)
  yield from ds.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, min(read.num_threads, 4)),
      prefetch_buffer_size=4))


# ---------------------------------------------------------------------------
# TFDS datasets through grain: sources, per-example functions, info.
# ---------------------------------------------------------------------------


def parse_name(name: str) -> tuple[str, str]:
  """`'tfds:imagenet2012'` -> ('tfds', 'imagenet2012'); the builders of
  `gendd_jax.cli.build_dataset` are named `'<kind>:<name>'` likewise."""
  if ':' not in name:
    raise PipelineError(f'data.name {name!r}: expected "<kind>:<name>", e.g. '
                        '"tfds:imagenet2012" or "folder:my_images"')
  kind, _, rest = name.partition(':')
  if not rest:
    raise PipelineError(f'data.name {name!r} names no dataset')
  return kind, rest


def open_source(name: str, split: str, data_dir: str | None,
                decode_images: bool = False):
  """A random-access source of the records of `name`/`split`.

  Images stay encoded (decoded and augmented in the pipeline, where a
  corrupt one is skipped and counted) unless `decode_images`.
  """
  kind, dataset = parse_name(name)
  data_dir = paths.expand(data_dir)
  if kind == 'tfds':
    decoders = None if decode_images else {
        'image': tfds.decode.SkipDecoding()}
    try:
      if data_dir and paths.is_remote(data_dir):
        data_dir = paths.local_copy(data_dir, dataset.split(':')[0])
      return tfds.data_source(dataset, split=split, data_dir=data_dir or None,
                              decoders=decoders)
    except Exception as e:  # pylint: disable=broad-except
      raise PipelineError(
          f'cannot open TFDS dataset {dataset!r} split {split!r} in data_dir '
          f'{data_dir or "(default)"} ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); prepare it first '
          '(array_record format), see docs/data.md') from e
  decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
  try:
    return builders.load_source(kind, dataset, data_dir, split,
                                decoders=decoders)
  except (BuildError, ValueError) as e:
    raise PipelineError(f'{name} split {split!r}: {e}') from e


def source_num_classes(source) -> int | None:
  """The label count recorded in a TFDS source's metadata, if any."""
  info = getattr(source, 'dataset_info', None)
  try:
    return int(info.features['label'].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None


def example_fn(transform: Callable[[np.ndarray, np.random.Generator],
                                   np.ndarray],
               skipped: SkipCounter | None = None,
               labelled: bool = True) -> ExampleFn:
  """record -> `{image, id[, label, label_mask]}`; None (counted) when the
  image cannot be decoded."""

  def fn(record, rng):
    image = record['image']
    if isinstance(image, (bytes, np.bytes_)):
      try:
        image = augment.decode(bytes(image))
      except CorruptImageError:
        if skipped is not None:
          skipped.add(str(record.get('file_name', record['_index'])))
        return None
    out = {'image': np.asarray(transform(np.asarray(image), rng),
                               np.float32),
           'id': np.int64(record.get('id', record['_index']))}
    if labelled and 'label' in record:
      out['label'] = np.int32(record['label'])
      out['label_mask'] = np.bool_(True)
    return out
  return fn


def mix_transform(d, num_classes: int) -> BatchFn | None:
  """Mixup/CutMix and label smoothing as a batch transform (soft labels)."""
  mixup, cutmix = d.get('mixup', 0.0), d.get('cutmix', 0.0)
  smoothing = d.get('label_smoothing', 0.0)
  if not (mixup > 0 or cutmix > 0 or smoothing > 0):
    return None

  def fn(batch, rng):
    if 'label' not in batch:
      return batch
    images, labels = augment.mix_batch(
        batch['image'], batch['label'], num_classes, rng,
        mixup_alpha=mixup, cutmix_alpha=cutmix,
        switch_prob=d.get('mix_switch_prob', 0.5), label_smoothing=smoothing)
    return dict(batch, image=images, label=labels)
  return fn


def _read_settings(d) -> ReadSettings:
  return ReadSettings(num_threads=d.num_threads, prefetch=d.prefetch,
                      num_workers=d.num_workers)


def _eval_source(d):
  """The labelled evaluation split: `data.eval_name` (label-free training
  sets, e.g. CC3M-style shards, evaluate on another dataset) or the
  training dataset's `data.eval_split`."""
  eval_name = d.get('eval_name') or d.name
  try:
    src = open_source(eval_name, d.eval_split, d.data_dir or None)
  except PipelineError as e:
    hint = '' if d.get('eval_name') else (
        '; to evaluate on another dataset set data.eval_name (e.g. '
        'tfds:imagenet2012)')
    raise PipelineError(f'{e}{hint}') from e
  if not len(src):
    raise PipelineError(f'the evaluation split {eval_name}/{d.eval_split} '
                        'is empty')
  if 'label' not in src[0]:
    raise PipelineError(f'the evaluation split {eval_name}/{d.eval_split} '
                        'has no labels; set data.eval_name to a labelled '
                        'dataset (e.g. tfds:imagenet2012)')
  return src


def open_eval(d, process_index: int = 0, process_count: int = 1):
  """`(num_classes or 0, () -> batches)` of the evaluation split alone: no
  other split of the dataset is opened (it need not exist)."""
  src = _eval_source(d)
  try:
    view = augment.eval_transform(d.augment, d.image_size)
  except ValueError as e:
    raise PipelineError(str(e)) from e
  fn = example_fn(view, SkipCounter('undecodable evaluation images'), True)
  num_classes = int(d.num_classes) or source_num_classes(src)
  return num_classes, lambda: eval_batches(
      src, d.eval_batch_size, fn, process_index=process_index,
      process_count=process_count, read=_read_settings(d))


class ChosenStream:
  """A training stream served from memory or streamed through grain, chosen
  on first use (`next`, `get_state`, `set_state`): only then is the split
  decoded, so a dataset opened for its evaluation split alone costs nothing.

  Args:
    streamed: the grain stream (built, not yet read).
    in_memory_fn: `() -> DecodedStream`, or None when the split does not
      fit in memory.
  """

  def __init__(self, streamed: TrainStream,
               in_memory_fn: Callable[[], decoded.DecodedStream | None]):
    self.steps_per_epoch = streamed.steps_per_epoch
    self._streamed = streamed
    self._in_memory_fn = in_memory_fn
    self._chosen = None

  @property
  def chosen(self) -> TrainStream | decoded.DecodedStream:
    """The stream that serves the batches (decided at the first call)."""
    if self._chosen is None:
      self._chosen = self._in_memory_fn() or self._streamed
      self._in_memory_fn = None
    return self._chosen

  def __iter__(self) -> 'ChosenStream':
    return self

  def __next__(self) -> Example:
    return next(self.chosen)

  def get_state(self) -> dict[str, Any]:
    return self.chosen.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.chosen.set_state(state)


def in_memory_limit_bytes(d) -> int:
  """`data.in_memory_limit_mb` in bytes (0: never in memory)."""
  limit = d.get('in_memory_limit_mb', DEFAULT_IN_MEMORY_LIMIT_MB)
  if (isinstance(limit, bool) or not isinstance(limit, (int, float))
      or not limit >= 0):
    raise PipelineError('data.in_memory_limit_mb must be a number >= 0 (0: '
                        f'always stream), got {limit!r}')
  return int(limit * decoded.MB)


def _in_memory_stream(d, source, seed: int, view, mixer, skipped,
                      process_index: int, process_count: int
                      ) -> decoded.DecodedStream | None:
  """The training stream served from memory when this process's decoded
  slice fits `data.in_memory_limit_mb`, else None (stream through grain);
  logs which, with the decoded size."""
  limit = in_memory_limit_bytes(d)
  what = f'training split {d.name}/{d.train_split}'
  if process_count > 1:
    what += f' (process {process_index} of {process_count}: its slice)'
  if not limit:
    logging.info('%s: streamed through grain, decoded per example '
                 '(data.in_memory_limit_mb=0)', what)
    return None
  data, size = decoded.decode_slice(source, limit, process_index,
                                    process_count, skipped)
  setting = ('data.in_memory_limit_mb='
             f'{d.get("in_memory_limit_mb", DEFAULT_IN_MEMORY_LIMIT_MB)}')
  if data is None:
    logging.info('%s: decoded size about %.1f MB is over %s; streamed '
                 'through grain, decoded per example', what, size / decoded.MB,
                 setting)
    return None
  logging.info('%s: %d images decoded into memory once (%.1f MB, within %s)'
               '; served from memory%s', what, int(data.good.sum()),
               size / decoded.MB, setting,
               ' (data.num_workers is not used)' if d.num_workers else '')
  return decoded.DecodedStream(
      data, len(source), d.batch_size, seed, view, mixer,
      process_index=process_index, process_count=process_count)


def open_dataset(d, seed: int, process_index: int = 0,
                 process_count: int = 1):
  """The parts of a `data.Dataset` for a TFDS/builder dataset (`'<kind>:
  <name>'`) read through grain: `(info, train, () -> eval, () -> train)`."""
  if d.label_fraction < 1.0:
    raise PipelineError('data.label_fraction < 1 is only supported for the '
                        'in-memory datasets')
  read = _read_settings(d)
  data_dir = d.data_dir or None
  train_src = open_source(d.name, d.train_split, data_dir)
  eval_src = _eval_source(d)
  num_classes = (int(d.num_classes) or source_num_classes(train_src)
                 or source_num_classes(eval_src))
  if not num_classes:
    raise PipelineError(f'{d.name} records no label count; set '
                        'data.num_classes')
  try:
    train_view = augment.train_transform(
        d.augment, d.image_size, crop_scale=float(d.get('crop_scale', 0.6)))
    eval_view = augment.eval_transform(d.augment, d.image_size)
  except ValueError as e:
    raise PipelineError(str(e)) from e
  first = train_src[0]
  labelled = 'label' in first
  skipped = SkipCounter('undecodable training images')
  mixer = mix_transform(d, num_classes) if labelled else None
  in_memory_limit_bytes(d)  # A bad value fails here, not at the first step.
  stream = ChosenStream(
      TrainStream(train_src, d.batch_size, seed,
                  example_fn(train_view, skipped, labelled), mixer,
                  process_index=process_index, process_count=process_count,
                  read=read),
      lambda: _in_memory_stream(d, train_src, seed, train_view, mixer,
                                skipped, process_index, process_count))

  def batches(src):
    fn = example_fn(eval_view, SkipCounter('undecodable evaluation images'),
                    src is eval_src or labelled)
    return eval_batches(src, d.eval_batch_size, fn,
                        process_index=process_index,
                        process_count=process_count, read=read)

  info = dict(num_classes=num_classes, labelled=labelled,
              input_shape=(d.image_size, d.image_size, 3),
              num_examples=len(train_src), skipped=skipped)
  return (info, stream, lambda: batches(eval_src),
          lambda: batches(train_src))
