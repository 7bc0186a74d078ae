"""TFDS builders that write image datasets as `array_record`, and read them
back as sources (`load_source`, `info`).

Four kinds of source, each built into its own TFDS dataset under `data_dir`:

* `folder`: an image folder with one sub-folder per class (torchvision's
  ImageFolder: classes are the sorted sub-folder names, the label is the
  index; sub-folders whose name starts with '.' are ignored). Files ending in
  .jpg/.jpeg/.png/.bmp/.webp (any case) anywhere below a class folder are
  images; other files are ignored. Splits: if `<src>/train` is a folder, each
  of `train`, `val`, `validation` and `test` present under `<src>` is a split
  of that name holding class sub-folders, and the classes are those of
  `train` (a class in another split but not in `train` is an error);
  otherwise `<src>` itself holds the class sub-folders and is the single
  split `train`.
* `imagenet_lt`: ImageNet-LT, the 1000-class long-tailed subset of ImageNet
  named by `ImageNet_LT_{train,val,test}.txt` (lines `relative/path.JPEG
  label`, paths relative to the ImageNet folder `<src>`). Splits `train`,
  `val`, `test`; the class names are the ImageNet synset ids in the standard
  sorted order (the list files' labels).
* `unlabeled`: webdataset-style `.tar` shards (a glob, a folder of `.tar`
  files, or one file) whose `.jpg`/`.jpeg`/`.png` members are the images;
  other members (`.txt`, `.json`, ...) are ignored. One split, `train`,
  without labels (features `image`, `id`, `key`).
* `npz`: arrays in an `.npz` file: `images` (uint8 `[N, H, W, C]` or
  `[N, H, W]`) and `labels` (int `[N]`) as split `train`, or
  `<split>_images`/`<split>_labels` pairs for any split names; optional
  `class_names` (str `[K]`). Images are stored losslessly as PNG.

Every example has `id` (int64): its index in the split's sorted (folder),
listed (imagenet_lt, npz) or shard-then-member (unlabeled) order, so
precomputed teacher features can be joined on it. Ids of skipped images are
not reused, so they stay stable whether or not a file is readable. JPEG and
PNG bytes are stored unchanged when Pillow decodes them as 8-bit RGB (L for
one-channel npz data); other images (BMP, WebP, CMYK or grayscale JPEG,
palette PNG, ...) are converted to RGB and stored as PNG. Images that Pillow
cannot decode are skipped and counted; the count and the first few paths are
printed and stored in the dataset's metadata (`metadata.json`, read back by
`info`).

A dataset lives at `<data_dir>/<builder>/<name>/1.0.0` and is read, without
TensorFlow, with `tfds.data_source('<builder>/<name>', data_dir=...)` or
`load_source(kind, name, data_dir, split)`. Building needs no TensorFlow
either. TFDS writes into a temporary folder and renames it when complete, so
a failed build never leaves a dataset that reads as built.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import importlib.resources
import io
import logging
import os
import re
import tarfile
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from gendd_jax import paths
from gendd_jax.errors import BuildError
from gendd_jax.errors import CorruptImageError

KINDS = ('folder', 'imagenet_lt', 'unlabeled', 'npz')
BUILDER_NAMES = {'folder': 'gendd_image_folder',
                 'imagenet_lt': 'gendd_imagenet_lt',
                 'unlabeled': 'gendd_unlabeled_images',
                 'npz': 'gendd_npz_images'}
VERSION = '1.0.0'
_INFO = 'dataset_info.json'  # Written last; its presence marks a built dataset.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
SHARD_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
FOLDER_SPLITS = ('train', 'val', 'validation', 'test')
LT_SPLITS = ('train', 'val', 'test')
LT_LIST_FILE = 'ImageNet_LT_{split}.txt'
LT_NUM_CLASSES = 1000
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
# Formats whose bytes are kept as they are (MPO is a JPEG with extra frames).
PASSTHROUGH_FORMATS = ('JPEG', 'MPO', 'PNG')
SHOWN = 5  # How many paths an error or a skip report names.
KEPT = 20  # How many skipped paths the metadata keeps per split.

_NAME_RE = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', re.ASCII)
_WNID_RE = re.compile(r'n\d{8}')
_OBJECT_REPR_RE = re.compile(r'\s*<[^<>]* at 0x[0-9a-fA-F]+>')


# ---------------------------------------------------------------------------
# Plans: what to write, found and checked before TFDS creates anything.


@dataclasses.dataclass(frozen=True, slots=True)  # Millions of them.
class Example:
  """One record to write, before its image is read.

  Attributes:
    id: the example id (unique within its split).
    source: where the image comes from, as shown in messages and stored as
      `file_name` (folder, imagenet_lt) or `key` (unlabeled).
    payload: a file path (str), encoded image bytes, or uint8 pixels
      `[H, W, C]` (npz).
    label: the class index, or None for unlabeled data.
  """
  id: int
  source: str
  payload: Any
  label: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a builder needs: classes, image spec and the examples.

  Attributes:
    kind: one of `KINDS`.
    source: the source as given (stored in the metadata).
    class_names: the class names (label i is `class_names[i]`), or None for
      unlabeled data.
    splits: split name -> a function returning that split's examples (a
      function, so tar shards are only streamed while writing).
    image_shape: the `tfds.features.Image` shape.
    notes: lines to print before building (ignored folders, ...).
  """
  kind: str
  source: str
  class_names: tuple[str, ...] | None
  splits: Mapping[str, Callable[[], Iterable[Example]]]
  image_shape: tuple[int | None, int | None, int] = (None, None, 3)
  notes: tuple[str, ...] = ()


def _listed(examples: Sequence[Example]) -> Callable[[], Iterable[Example]]:
  return functools.partial(iter, examples)


def _head(items: Sequence[str], n: int = SHOWN) -> str:
  shown = ', '.join(str(s) for s in items[:n])
  return shown + (', ...' if len(items) > n else '')


def _is_image_file(name: str, extensions: Sequence[str]) -> bool:
  return name.lower().endswith(tuple(extensions))


def class_folders(root: str) -> list[str]:
  """Sorted names of the non-hidden sub-folders of `root`."""
  with os.scandir(root) as it:
    return sorted(e.name for e in it
                  if e.is_dir() and not e.name.startswith('.'))


def folder_files(class_dir: str) -> list[str]:
  """Image files below `class_dir` in torchvision's ImageFolder order."""
  files = []
  for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
    files.extend(os.path.join(root, n) for n in sorted(names)
                 if _is_image_file(n, IMAGE_EXTENSIONS))
  return files


def _require_dir(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise BuildError(f'{what} {path} does not exist')
  if not os.path.isdir(path):
    raise BuildError(f'{what} {path} is not a folder')


def plan_folder(src: str) -> Plan:
  """The examples of an image folder (see the module docstring for rules)."""
  _require_dir(src, 'image folder')
  if os.path.isdir(os.path.join(src, 'train')):
    split_dirs = {s: os.path.join(src, s) for s in FOLDER_SPLITS
                  if os.path.isdir(os.path.join(src, s))}
    ignored = [d for d in class_folders(src) if d not in FOLDER_SPLITS]
  else:
    split_dirs, ignored = {'train': src}, []
  classes = class_folders(split_dirs['train'])
  if not classes:
    raise BuildError(f'no class sub-folders in {split_dirs["train"]} (one '
                     'sub-folder per class is expected)')
  index = {c: i for i, c in enumerate(classes)}
  notes = [f'ignored folders under {src} (not a split name): '
           f'{_head(ignored)}'] if ignored else []
  splits = {}
  for split, split_dir in split_dirs.items():
    present = class_folders(split_dir)
    unknown = [c for c in present if c not in index]
    if unknown:
      raise BuildError(f'{split_dir} has {len(unknown)} class folder(s) not '
                       f'in {split_dirs["train"]}: {_head(unknown)}')
    examples, empty = [], []
    for c in present:
      files = folder_files(os.path.join(split_dir, c))
      if not files:
        empty.append(c)
      examples.extend(
          Example(id=i, label=index[c], payload=f,
                  source=os.path.relpath(f, src).replace(os.sep, '/'))
          for i, f in enumerate(files, start=len(examples)))
    if not examples:
      raise BuildError(f'no images ({"/".join(IMAGE_EXTENSIONS)}) in the '
                       f'class folders of {split_dir}')
    if empty:
      notes.append(f'{split}: {len(empty)} class folder(s) without images: '
                   f'{_head(empty)}')
    splits[split] = _listed(examples)
  return Plan('folder', src, tuple(classes), splits, notes=tuple(notes))


def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 ImageNet synset ids in the standard (sorted) label order."""
  path = (importlib.resources.files('tensorflow_datasets') / 'datasets' /
          'imagenet2012' / 'labels.txt')
  names = tuple(path.read_text().split())
  assert len(names) == LT_NUM_CLASSES, len(names)
  return names


def read_list_file(path: str) -> list[tuple[str, int]]:
  """`(relative path, label)` per non-blank line of an ImageNet-LT list."""
  entries = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.rsplit(None, 1)
      if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
        raise BuildError(f'{path} line {n}: expected "relative/path.JPEG '
                         f'label", got {line.strip()[:80]!r}')
      entries.append((parts[0].strip(), int(parts[1])))
  if not entries:
    raise BuildError(f'{path} lists no images')
  return entries


def plan_imagenet_lt(src: str, lists: str | None = None) -> Plan:
  """ImageNet-LT from an ImageNet folder and the three list files.

  Args:
    src: the ImageNet folder the list paths are relative to (it holds
      `train/<wnid>/*.JPEG`, and `val/...` as the lists name them).
    lists: the folder holding `ImageNet_LT_{train,val,test}.txt` (default:
      `src`).
  """
  _require_dir(src, 'ImageNet folder')
  lists = src if lists is None else lists
  _require_dir(lists, 'ImageNet-LT list folder')
  files = {s: os.path.join(lists, LT_LIST_FILE.format(split=s))
           for s in LT_SPLITS}
  absent = [os.path.basename(f) for f in files.values()
            if not os.path.isfile(f)]
  if absent:
    raise BuildError(f'ImageNet-LT list file(s) missing from {lists}: '
                     f'{", ".join(absent)}')
  names = imagenet_class_names()
  splits = {}
  for split, list_path in files.items():
    entries = read_list_file(list_path)
    list_name = os.path.basename(list_path)
    bad = [f'{p} {y}' for p, y in entries if not 0 <= y < LT_NUM_CLASSES]
    if bad:
      raise BuildError(f'{list_name}: {len(bad)} label(s) outside [0, '
                       f'{LT_NUM_CLASSES}): {_head(bad)}')
    # A synset folder in the path must be the label's synset: a list with
    # another label order would otherwise train on wrong labels silently.
    wrong = [f'{p} {y}' for p, y in entries
             if _WNID_RE.fullmatch(_parent(p) or '') and
             _parent(p) != names[y]]
    if wrong:
      raise BuildError(f'{list_name}: {len(wrong)} line(s) whose synset '
                       'folder is not the label\'s ImageNet synset (labels '
                       f'must follow the sorted synset order): {_head(wrong)}')
    missing = [p for p, _ in entries
               if not os.path.isfile(os.path.join(src, p))]
    if missing:
      raise BuildError(f'{list_name} names {len(missing)} image(s) missing '
                       f'under {src}: {_head(missing)}')
    splits[split] = _listed([
        Example(id=i, source=p, payload=os.path.join(src, p), label=y)
        for i, (p, y) in enumerate(entries)])
  return Plan('imagenet_lt', src, names, splits)


def _parent(relpath: str) -> str | None:
  parts = relpath.replace('\\', '/').split('/')
  return parts[-2] if len(parts) >= 2 else None


def shard_paths(src: str) -> list[str]:
  """Sorted `.tar` shards named by a glob, a folder or one file."""
  if os.path.isdir(src):
    paths = glob.glob(os.path.join(glob.escape(src), '*.tar'))
  else:
    paths = [p for p in glob.glob(os.path.expanduser(src))
             if os.path.isfile(p)]
  if not paths:
    raise BuildError(f'no tar shards match {src}')
  return sorted(paths)


def shard_examples(paths: Sequence[str], skipped: list[str]
                   ) -> Iterator[Example]:
  """Image members of tar shards, in shard then member order.

  Ids count image members over all shards. A shard that cannot be read to
  its end is noted in `skipped` and the next shard is read.
  """
  next_id = 0
  for path in paths:
    shard = os.path.basename(path)
    try:
      with tarfile.open(path, 'r:*') as tar:
        for member in tar:
          if not (member.isfile() and _is_image_file(
              member.name, SHARD_IMAGE_EXTENSIONS)):
            continue
          key = f'{shard}/{os.path.splitext(member.name)[0]}'
          data = tar.extractfile(member).read()
          yield Example(id=next_id, source=key, payload=data)
          next_id += 1
    except (tarfile.TarError, OSError, EOFError) as e:
      skipped.append(f'{shard}: unreadable after {next_id} images '
                     f'({_reason(e)})')


def plan_unlabeled(src: str) -> Plan:
  """Unlabeled images from webdataset-style tar shards."""
  paths = shard_paths(src)
  not_tar = [os.path.basename(p) for p in paths if not tarfile.is_tarfile(p)]
  if not_tar:
    raise BuildError(f'{len(not_tar)} file(s) matching {src} are not tar '
                     f'archives: {_head(not_tar)}')
  return Plan('unlabeled', src, None, {'train': ShardStream(tuple(paths))})


@dataclasses.dataclass(frozen=True)
class ShardStream:
  """Streams the image members of tar shards (see `shard_examples`).

  Attributes:
    paths: the shards, in order.
    notes: filled while streaming with the shards that could not be read to
      their end.
  """
  paths: tuple[str, ...]
  notes: list[str] = dataclasses.field(default_factory=list)

  def __call__(self) -> Iterator[Example]:
    return shard_examples(self.paths, self.notes)


def _npz_splits(arrays: Mapping[str, np.ndarray], src: str
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Split name -> `(images, labels)` from the array names."""
  keys = set(arrays)
  if 'images' in keys:
    prefixed = sorted(k for k in keys if k.endswith('_images'))
    if prefixed:
      raise BuildError(f'{src} has both `images` and {_head(prefixed)}; use '
                       'one naming scheme')
    pairs = {'train': ('images', 'labels')}
  else:
    pairs = {k[:-len('_images')]: (k, k[:-len('_images')] + '_labels')
             for k in sorted(keys) if k.endswith('_images')}
  if not pairs:
    raise BuildError(f'{src} holds no `images` or `<split>_images` array '
                     f'(arrays: {_head(sorted(keys))})')
  out = {}
  for split, (ik, lk) in pairs.items():
    if lk not in keys:
      raise BuildError(f'{src} has `{ik}` but no `{lk}`')
    out[split] = (arrays[ik], arrays[lk])
  return out


def plan_npz(src: str) -> Plan:
  """Labelled images from arrays in an `.npz` file."""
  if not os.path.isfile(src):
    raise BuildError(f'npz file {src} does not exist')
  try:
    with np.load(src, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise BuildError(f'cannot read {src} as .npz: {_reason(e)}') from e
  splits = _npz_splits(arrays, src)
  shapes, max_label = set(), -1
  for split, (images, labels) in splits.items():
    if images.dtype != np.uint8:
      raise BuildError(f'{split} images must be uint8, got {images.dtype}')
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise BuildError(f'{split} images must be [N, H, W, C] with C 1 or 3 '
                       f'(or [N, H, W]), got shape {images.shape}')
    if labels.ndim != 1 or len(labels) != len(images):
      raise BuildError(f'{split}: {len(images)} images but labels of shape '
                       f'{labels.shape}')
    if not np.issubdtype(labels.dtype, np.integer):
      raise BuildError(f'{split} labels must be integers, got {labels.dtype}')
    if not len(images):
      raise BuildError(f'{split} has no images')
    if labels.min() < 0:
      raise BuildError(f'{split} has negative labels')
    max_label = max(max_label, int(labels.max()))
    shapes.add(images.shape[1:])
    splits[split] = (images, labels)
  if len({s[-1] for s in shapes}) > 1:
    raise BuildError(f'the splits have different channel counts: {shapes}')
  names = _npz_class_names(arrays, max_label, src)
  shape = shapes.pop() if len(shapes) == 1 else (
      None, None, next(iter(shapes))[-1])
  plan_splits = {
      split: _listed([Example(id=i, source=f'{split}[{i}]', payload=img,
                              label=int(y))
                      for i, (img, y) in enumerate(zip(images, labels))])
      for split, (images, labels) in splits.items()}
  return Plan('npz', src, names, plan_splits, image_shape=tuple(shape))


def _npz_class_names(arrays: Mapping[str, np.ndarray], max_label: int,
                     src: str) -> tuple[str, ...]:
  if 'class_names' not in arrays:
    return tuple(str(i) for i in range(max_label + 1))
  names = tuple(str(n) for n in arrays['class_names'])
  if max_label >= len(names):
    raise BuildError(f'{src}: label {max_label} but only {len(names)} '
                     'class_names')
  if len(set(names)) != len(names):
    raise BuildError(f'{src}: class_names are not unique')
  return names


def create_plan(kind: str, src: str, lists: str | None = None) -> Plan:
  """Finds and checks the examples of a source of `kind`.

  Raises:
    BuildError: for an unknown kind or a source that cannot be built.
  """
  check_kind(kind)
  if kind != 'imagenet_lt' and lists is not None:
    raise BuildError('--lists only applies to kind imagenet_lt')
  if kind == 'folder':
    return plan_folder(src)
  if kind == 'imagenet_lt':
    return plan_imagenet_lt(src, lists)
  if kind == 'unlabeled':
    return plan_unlabeled(src)
  return plan_npz(src)


# ---------------------------------------------------------------------------
# Reading and checking images.


def _reason(e: BaseException) -> str:
  text = str(e).splitlines()[0] if str(e) else ''
  text = _OBJECT_REPR_RE.sub('', text)  # Pillow names its BytesIO object.
  return f'{type(e).__name__}: {text}'[:120]


def _png(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, format='PNG')
  return out.getvalue()


def encode_image(data: bytes, mode: str = 'RGB') -> tuple[bytes, bool]:
  """Checks that Pillow decodes `data`, converting it if it must.

  Args:
    data: an encoded image.
    mode: the Pillow mode to store ('RGB', or 'L' for one channel).

  Returns:
    `(bytes to store, converted)`: `data` itself for a JPEG/PNG already in
    `mode`, else the image converted to `mode` as PNG.

  Raises:
    CorruptImageError: Pillow cannot decode the whole image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in PASSTHROUGH_FORMATS and image.mode == mode:
        return data, False
      return _png(image.convert(mode)), True
  except Exception as e:  # Any failure to decode means "unreadable".
    raise CorruptImageError(_reason(e)) from e


def read_payload(payload: Any, mode: str) -> tuple[bytes, bool]:
  """Bytes to store for an `Example.payload` (see `encode_image`)."""
  if isinstance(payload, np.ndarray):  # Exact pixels: lossless PNG.
    pixels = payload[..., 0] if payload.shape[-1] == 1 else payload
    return _png(Image.fromarray(pixels)), False
  if isinstance(payload, str):
    try:
      with open(payload, 'rb') as f:
        payload = f.read()
    except OSError as e:
      raise CorruptImageError(_reason(e)) from e
  return encode_image(payload, mode)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any],
                workers: int, window: int = 256) -> Iterator[Any]:
  """`map(fn, items)` on `workers` threads, in order, `window` in flight.

  Pillow and file reads release the GIL, so threads decode in parallel.
  """
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _checked(example: Example, mode: str):
  try:
    data, converted = read_payload(example.payload, mode)
  except CorruptImageError as e:
    return example, None, False, str(e)
  return example, data, converted, None


# ---------------------------------------------------------------------------
# The TFDS builders.


class _GenddBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the examples of a `Plan`; subclasses define the features.

  The builders are not registered with TFDS: datasets are read from their
  files (`tfds.data_source('<builder>/<name>', ...)` finds them there),
  and the per-build name is a `BuilderConfig` made at build time.
  """

  VERSION = tfds.core.Version(VERSION)
  # TFDS looks this up through `importlib_resources`, which is not a
  # dependency; the file path is all it needs.
  code_path = epath.Path(__file__)

  def __init__(self, *, plan: Plan | None = None, workers: int = 1,
               **kwargs):
    self._plan = plan
    self._workers = workers
    super().__init__(**kwargs)

  def _features(self) -> dict[str, Any]:
    raise NotImplementedError

  def _record(self, example: Example, image: bytes) -> dict[str, Any]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    labelled = 'label' in self._features()
    return self.dataset_info_from_configs(
        description=(f'Built by gendd_jax.cli.build_dataset from '
                     f'{self._plan.source}.' if self._plan else None),
        features=tfds.features.FeaturesDict(self._features()),
        supervised_keys=('image', 'label') if labelled else None,
        # Records stay in id order: sequential reads are reproducible and
        # record i is id i when nothing was skipped.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _image_feature(self) -> tfds.features.Image:
    shape = self._plan.image_shape if self._plan else (None, None, 3)
    return tfds.features.Image(shape=shape)

  def _split_generators(self, dl_manager):
    del dl_manager  # Sources are local; the plan holds their paths.
    plan = self._plan
    if plan.class_names is not None:
      self.info.features['label'].names = list(plan.class_names)
    self.info.metadata.update(kind=plan.kind, source=plan.source,
                              skipped={}, converted={})
    return {split: self._generate_examples(split)
            for split in plan.splits}

  def _generate_examples(self, split: str):
    plan = self._plan
    mode = 'L' if plan.image_shape[-1] == 1 else 'RGB'
    stream = plan.splits[split]
    skipped, converted, written = [], 0, 0
    for example, data, conv, reason in ordered_map(
        functools.partial(_checked, mode=mode), stream(), self._workers):
      if data is None:
        skipped.append(f'{example.source} ({reason})')
        continue
      converted += conv
      written += 1
      yield example.id, self._record(example, data)
    count = len(skipped)
    skipped.extend(getattr(stream, 'notes', ()))  # Unreadable tar shards.
    self.info.metadata['skipped'][split] = dict(count=count,
                                                examples=skipped[:KEPT])
    self.info.metadata['converted'][split] = converted
    if not written:
      raise BuildError(f'split {split!r} of {plan.source} has no readable '
                       f'image ({count} skipped: {_head(skipped)})')


class GenddImageFolder(_GenddBuilder, skip_registration=True):
  """An image folder, one sub-folder per class."""

  name = BUILDER_NAMES['folder']

  def _features(self):
    return {'image': self._image_feature(),
            'label': tfds.features.ClassLabel(),
            'id': np.int64,
            'file_name': tfds.features.Text()}

  def _record(self, example, image):
    return {'image': image, 'label': example.label, 'id': example.id,
            'file_name': example.source}


class GenddImagenetLt(GenddImageFolder, skip_registration=True):
  """ImageNet-LT from an ImageNet folder and the list files."""

  name = BUILDER_NAMES['imagenet_lt']


class GenddUnlabeledImages(_GenddBuilder, skip_registration=True):
  """Unlabeled images from tar shards."""

  name = BUILDER_NAMES['unlabeled']

  def _features(self):
    return {'image': self._image_feature(), 'id': np.int64,
            'key': tfds.features.Text()}

  def _record(self, example, image):
    return {'image': image, 'id': example.id, 'key': example.source}


class GenddNpzImages(_GenddBuilder, skip_registration=True):
  """Labelled images from `.npz` arrays."""

  name = BUILDER_NAMES['npz']

  def _features(self):
    return {'image': self._image_feature(),
            'label': tfds.features.ClassLabel(), 'id': np.int64}

  def _record(self, example, image):
    return {'image': image, 'label': example.label, 'id': example.id}


BUILDERS = {'folder': GenddImageFolder, 'imagenet_lt': GenddImagenetLt,
            'unlabeled': GenddUnlabeledImages, 'npz': GenddNpzImages}


# ---------------------------------------------------------------------------
# Building and reading.


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise BuildError(f'unknown dataset kind {kind!r}; available: '
                     f'{", ".join(KINDS)}')


def default_name(kind: str, src: str) -> str:
  """The dataset name when none is given: from the source's file name for
  `folder` and `npz`, else 'default'."""
  if kind not in ('folder', 'npz'):
    return 'default'
  base = os.path.basename(os.path.normpath(os.path.abspath(src)))
  if kind == 'npz':
    base = os.path.splitext(base)[0]
  name = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_')
  return name or 'default'


def check_name(name: str) -> None:
  if not _NAME_RE.fullmatch(name):
    raise BuildError(f'invalid dataset name {name!r}: use letters, digits, '
                     "'_', '.' and '-', starting with a letter, digit or '_'")


def dataset_name(kind: str, name: str) -> str:
  """The TFDS name for `tfds.data_source`, e.g. 'gendd_image_folder/pets'."""
  check_kind(kind)
  check_name(name)
  return f'{BUILDER_NAMES[kind]}/{name}'


def dataset_dir(kind: str, name: str, data_dir: str) -> str:
  """Where a built dataset lives (`<data_dir>/<builder>/<name>/<version>`;
  `data_dir` may be `~/...` or `gs://...`)."""
  return os.path.join(paths.absolute(data_dir), dataset_name(kind, name),
                      VERSION)


def is_built(kind: str, name: str, data_dir: str) -> bool:
  return paths.isfile(os.path.join(dataset_dir(kind, name, data_dir), _INFO))


def build(kind: str, src: str, data_dir: str, name: str | None = None, *,
          lists: str | None = None, overwrite: bool = False,
          workers: int | None = None,
          log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Builds a dataset of `kind` from `src` into `data_dir` (array_record).

  An existing complete dataset of the same kind and name is kept unless
  `overwrite`. The source is checked before anything is written, and the
  dataset is built aside (`<data_dir>/.staging-<name>-<pid>`) and moved into
  place only once complete: a failed or interrupted build, with or without
  `overwrite`, leaves the earlier dataset as it was.

  Args:
    kind: one of `KINDS`.
    src: the image folder, ImageNet folder, shard glob or `.npz` file.
    data_dir: the TFDS data folder.
    name: the dataset name (default: `default_name(kind, src)`).
    lists: for `imagenet_lt`, the folder with the list files (default src).
    overwrite: rebuild a dataset that already exists.
    workers: threads that read and check images (default: up to 8).
    log: where progress lines go.

  Returns:
    `info(kind, name, data_dir)` of the built dataset.

  Raises:
    BuildError: the source cannot be built (nothing is left that reads as a
      built dataset).
  """
  check_kind(kind)
  data_dir = paths.absolute(data_dir)
  name = default_name(kind, src) if name is None else name
  check_name(name)
  target = dataset_dir(kind, name, data_dir)
  if is_built(kind, name, data_dir) and not overwrite:
    log(f'{dataset_name(kind, name)} is already built in {data_dir}; pass '
        '--overwrite to rebuild it')
    return info(kind, name, data_dir)
  plan = create_plan(kind, src, lists)
  for note in plan.notes:
    log(f'note: {note}')
  workers = workers or min(8, os.cpu_count() or 1)
  remote = paths.is_remote(data_dir)
  # array_record writes local files only: a remote dataset is built on local
  # disk and uploaded.
  staging = (tempfile.mkdtemp(prefix=f'gendd-build-{name}-') if remote else
             os.path.join(data_dir, f'.staging-{name}-{os.getpid()}'))
  try:
    with _quiet_tfds_logs(), tempfile.TemporaryDirectory() as downloads:
      builder = BUILDERS[kind](
          plan=plan, workers=workers, data_dir=staging,
          config=tfds.core.BuilderConfig(name=name, version=VERSION),
          file_format='array_record')
      builder.download_and_prepare(download_dir=downloads)  # Downloads none.
    built = dataset_dir(kind, name, staging)
    if remote:
      log(f'uploading to {target}')
      _swap_in_remote(built, target)
    else:
      _swap_in(built, target)
  finally:
    paths.rmtree(staging)
  result = info(kind, name, data_dir)
  log(summary(result))
  return result


def _swap_in(built: str, target: str) -> None:
  """Moves the complete dataset `built` to `target`; an older one there is
  moved aside first and deleted only after the new one is in place."""
  old = target + '.replaced'
  paths.rmtree(old)
  paths.makedirs(os.path.dirname(target))
  if paths.exists(target):
    epath.Path(target).rename(old)
  epath.Path(built).rename(target)
  paths.rmtree(old)


def _swap_in_remote(built: str, target: str) -> None:
  """`_swap_in` for an object store, which has no directory rename: the
  dataset is uploaded beside `target` first, so a failed upload leaves the
  older dataset whole; then the older one is unmarked (`dataset_info.json`
  goes first) and the new objects are moved in, `dataset_info.json` last."""
  incoming = target + '.incoming'
  paths.rmtree(incoming)
  paths.upload(built, incoming, last=(_INFO,))
  if paths.exists(f'{target}/{_INFO}'):
    epath.Path(f'{target}/{_INFO}').unlink()
  paths.rmtree(target)
  for rel in sorted(paths.files(built), key=lambda r: (r == _INFO, r)):
    paths.move_file(f'{incoming}/{rel}', f'{target}/{rel}')
  paths.rmtree(incoming)


@contextlib.contextmanager
def _quiet_tfds_logs():
  """Hides TFDS's info and warning logs (e.g. that the per-build config is
  "custom"), so a failing build ends with just its error line."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def info(kind: str, name: str, data_dir: str) -> dict[str, Any]:
  """What the lead needs of a built dataset.

  Returns:
    dict with `name` (for `tfds.data_source`), `dir`, `num_classes` and
    `class_names` (None for unlabeled), `num_examples` {split: n},
    `skipped` {split: n}, `skipped_examples` {split: [path (reason)]} and
    `converted` {split: n images stored converted to PNG}.

  Raises:
    BuildError: the dataset is not built.
  """
  path = dataset_dir(kind, name, data_dir)
  if not is_built(kind, name, data_dir):
    raise BuildError(f'dataset {dataset_name(kind, name)} is not built in '
                     f'{data_dir}; build it with `python -m '
                     f'gendd_jax.cli.build_dataset {kind} --src ... --data_dir '
                     f'{data_dir} --name {name}`')
  ds_info = tfds.builder_from_directory(path).info
  meta = dict(ds_info.metadata or {})
  label = ds_info.features['label'] if 'label' in ds_info.features else None
  skipped = meta.get('skipped', {})
  return dict(
      name=dataset_name(kind, name), dir=path,
      num_classes=label.num_classes if label else None,
      class_names=list(label.names) if label else None,
      num_examples={s: v.num_examples for s, v in ds_info.splits.items()},
      skipped={s: v['count'] for s, v in skipped.items()},
      skipped_examples={s: v['examples'] for s, v in skipped.items()},
      converted=dict(meta.get('converted', {})))


def summary(result: Mapping[str, Any]) -> str:
  """One line per dataset: examples per split and what was skipped."""
  counts = ', '.join(f'{s} {n}' for s, n in result['num_examples'].items())
  classes = (f', {result["num_classes"]} classes'
             if result['num_classes'] is not None else '')
  lines = [f'built {result["name"]} in {result["dir"]}: {counts}{classes}']
  for split, n in result['skipped'].items():
    examples = result['skipped_examples'][split]
    if n or examples:
      lines.append(f'skipped {n} unreadable image(s) in {split}: '
                   f'{_head(examples)}')
  return '\n'.join(lines)


def load_source(kind: str, name: str, data_dir: str, split: str,
                decoders: Mapping[str, Any] | None = None):
  """A built dataset's split as a random-access source (no TensorFlow).

  Args:
    kind: one of `KINDS`.
    name: the dataset name given when building.
    data_dir: the TFDS data folder.
    split: e.g. 'train', 'val', 'test'.
    decoders: passed to `tfds.data_source`, e.g. `{'image':
      tfds.decode.SkipDecoding()}` for the encoded bytes.

  Returns:
    A `tfds.data_source` (`len`, `[i]` -> dict of numpy values).
  """
  data_dir = paths.absolute(data_dir)
  info(kind, name, data_dir)  # A clear error if it is not built.
  local = paths.local_copy(data_dir, dataset_name(kind, name))
  return tfds.data_source(dataset_name(kind, name), data_dir=local,
                          split=split, decoders=decoders)


def check_imagenet_manual_dir(path: str) -> str:
  """Checks the TFDS `imagenet2012` manual download folder.

  Returns:
    `path`, when it holds both ImageNet tars.

  Raises:
    BuildError: naming exactly which of the tars is missing (or empty).
  """
  need = ' and '.join(IMAGENET_TARS)
  if not os.path.isdir(path):
    raise BuildError(f'imagenet2012 manual dir {path} does not exist; it '
                     f'must hold {need} (from https://image-net.org)')
  missing = [t for t in IMAGENET_TARS
             if not os.path.isfile(os.path.join(path, t))]
  empty = [t for t in IMAGENET_TARS if t not in missing and
           os.path.getsize(os.path.join(path, t)) == 0]
  if missing or empty:
    parts = []
    if missing:
      parts.append(f'lacks {" and ".join(missing)}')
    if empty:
      parts.append(f'has an empty {" and ".join(empty)}')
    raise BuildError(f'imagenet2012 manual dir {path} {"; ".join(parts)} '
                     f'(it must hold {need}, from https://image-net.org)')
  return path
