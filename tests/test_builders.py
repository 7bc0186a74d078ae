"""Tests for the array_record dataset builders and their command.

Every source is generated here (tiny JPEG/PNG folders, a fake ImageNet tree
with ImageNet-LT lists, tar shards, .npz arrays), built, and read back with
`tfds.data_source`: counts, labels, ids, pixels (PNG exactly), JPEG bytes
(stored unchanged), the skipped corrupt images, and clear errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from gendd_jax.cli import build_dataset
from gendd_jax.cli import common
from gendd_jax.data import builders

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORRUPT = b'\xff\xd8\xff\xe0 this is not a whole JPEG'

tfds.disable_progress_bar()


def _pixels(seed: int, shape=(6, 5, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def _encode(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
  out = io.BytesIO()
  image = Image.fromarray(pixels)
  if mode:
    image = image.convert(mode)
  image.save(out, format=fmt)
  return out.getvalue()


def _write(path: str, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def _decode_rgb(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert('RGB'))


def _read_all(name: str, data_dir: str, split: str, raw: bool = False):
  decoders = {'image': tfds.decode.SkipDecoding()} if raw else None
  src = tfds.data_source(name, data_dir=data_dir, split=split,
                         decoders=decoders)
  return [src[i] for i in range(len(src))]


class _TempDirClass(absltest.TestCase):
  """A temporary folder shared by the tests of a class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix='gendd_builders_')
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)


class FolderTest(_TempDirClass):
  """An image folder with train/ and val/ splits, mixed formats."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    src = os.path.join(cls.tmp, 'Pet Photos')
    cls.src, cls.data_dir = src, os.path.join(cls.tmp, 'data')
    files = {  # relative path -> bytes; classes cat, dog, eel (empty val).
        'train/cat/b.JPG': _encode(_pixels(1), 'JPEG'),
        'train/cat/a.png': _encode(_pixels(2), 'PNG'),
        'train/cat/bad.jpg': CORRUPT,
        'train/cat/sub/c.jpeg': _encode(_pixels(3), 'JPEG'),
        'train/cat/notes.txt': b'not an image',
        'train/dog/d.bmp': _encode(_pixels(4), 'BMP'),
        'train/dog/e.jpg': _encode(_pixels(5), 'JPEG', mode='L'),
        'train/eel/f.webp': _encode(_pixels(6), 'WEBP', mode='RGB'),
        'train/.cache/g.png': _encode(_pixels(7), 'PNG'),
        'val/dog/h.png': _encode(_pixels(8), 'PNG'),
        'val/cat/i.jpg': _encode(_pixels(9), 'JPEG'),
    }
    cls.files = files
    for rel, data in files.items():
      _write(os.path.join(src, rel), data)
    os.makedirs(os.path.join(src, 'extras'))
    cls.logs = []
    cls.result = builders.build('folder', src, cls.data_dir, workers=2,
                                log=cls.logs.append)

  def test_classes_counts_and_skipped(self):
    r = self.result
    self.assertEqual(r['name'], 'gendd_image_folder/pet_photos')
    self.assertEqual(r['class_names'], ['cat', 'dog', 'eel'])
    self.assertEqual(r['num_classes'], 3)
    self.assertEqual(r['num_examples'], {'train': 6, 'val': 2})
    self.assertEqual(r['skipped'], {'train': 1, 'val': 0})
    self.assertLen(r['skipped_examples']['train'], 1)
    self.assertStartsWith(r['skipped_examples']['train'][0],
                          'train/cat/bad.jpg (')
    self.assertNotIn('0x', r['skipped_examples']['train'][0])
    # BMP, grayscale JPEG and WebP are converted to RGB PNG.
    self.assertEqual(r['converted'], {'train': 3, 'val': 0})
    log = '\n'.join(self.logs)
    self.assertIn('skipped 1 unreadable image(s) in train: train/cat/bad.jpg',
                  log)
    self.assertIn('extras', log)  # The ignored non-split folder is noted.

  def test_ids_labels_and_files_in_sorted_order(self):
    train = _read_all('gendd_image_folder/pet_photos', self.data_dir, 'train')
    # Sorted order: cat/a.png, cat/b.JPG, cat/bad.jpg (skipped: id 2 unused),
    # cat/sub/c.jpeg, dog/d.bmp, dog/e.jpg, eel/f.webp.
    self.assertEqual([int(e['id']) for e in train], [0, 1, 3, 4, 5, 6])
    self.assertEqual([int(e['label']) for e in train], [0, 0, 0, 1, 1, 2])
    self.assertEqual([e['file_name'].decode() for e in train], [
        'train/cat/a.png', 'train/cat/b.JPG', 'train/cat/sub/c.jpeg',
        'train/dog/d.bmp', 'train/dog/e.jpg', 'train/eel/f.webp'])
    val = _read_all('gendd_image_folder/pet_photos', self.data_dir, 'val')
    self.assertEqual([(int(e['id']), int(e['label'])) for e in val],
                     [(0, 0), (1, 1)])

  def test_pixels_and_jpeg_bytes(self):
    name = 'gendd_image_folder/pet_photos'
    decoded = _read_all(name, self.data_dir, 'train')
    raw = _read_all(name, self.data_dir, 'train', raw=True)
    for d, r in zip(decoded, raw):
      source = self.files[d['file_name'].decode()]
      self.assertEqual(d['image'].dtype, np.uint8)
      self.assertEqual(d['image'].shape[-1], 3)
      np.testing.assert_array_equal(d['image'], _decode_rgb(source))
      if d['file_name'].decode().lower().endswith(('.jpg', '.jpeg', '.png')):
        if Image.open(io.BytesIO(source)).mode == 'RGB':
          self.assertEqual(r['image'], source)  # Passed through unchanged.
    np.testing.assert_array_equal(decoded[0]['image'], _pixels(2))  # PNG.
    np.testing.assert_array_equal(decoded[3]['image'], _pixels(4))  # BMP.

  def test_metadata_file(self):
    with open(os.path.join(self.result['dir'], 'metadata.json')) as f:
      meta = json.load(f)
    self.assertEqual(meta['kind'], 'folder')
    self.assertEqual(meta['skipped']['train']['count'], 1)

  def test_load_source_and_existing_dataset_is_kept(self):
    src = builders.load_source('folder', 'pet_photos', self.data_dir, 'val')
    self.assertLen(src, 2)
    logs = []
    again = builders.build('folder', self.src, self.data_dir, log=logs.append)
    self.assertEqual(again['num_examples'], self.result['num_examples'])
    self.assertIn('already built', logs[0])

  def test_split_class_not_in_train(self):
    src = os.path.join(self.tmp, 'mismatch')
    _write(os.path.join(src, 'train', 'a', 'x.png'), _encode(_pixels(13),
                                                              'PNG'))
    _write(os.path.join(src, 'test', 'b', 'y.png'), _encode(_pixels(14),
                                                             'PNG'))
    with self.assertRaisesRegex(builders.BuildError,
                                r'test has 1 class folder\(s\) not in .*: b$'):
      builders.create_plan('folder', src)

  def test_single_split_folder_and_overwrite(self):
    src = os.path.join(self.tmp, 'flat')
    _write(os.path.join(src, 'b', 'x.png'), _encode(_pixels(10), 'PNG'))
    _write(os.path.join(src, 'a', 'y.png'), _encode(_pixels(11), 'PNG'))
    r = builders.build('folder', src, self.data_dir, 'flat', workers=1,
                       log=lambda _: None)
    self.assertEqual(r['num_examples'], {'train': 2})
    self.assertEqual(r['class_names'], ['a', 'b'])
    _write(os.path.join(src, 'c', 'z.png'), _encode(_pixels(12), 'PNG'))
    r = builders.build('folder', src, self.data_dir, 'flat', overwrite=True,
                       log=lambda _: None)
    self.assertEqual(r['num_examples'], {'train': 3})
    self.assertEqual(r['class_names'], ['a', 'b', 'c'])
    # A rebuild that fails midway leaves the dataset as it was: it is built
    # aside and swapped in only when complete.
    _write(os.path.join(src, 'd', 'w.png'), _encode(_pixels(13), 'PNG'))

    def broken(self, *args, **kwargs):
      yield from ()
      raise RuntimeError('disk gone')
    with mock.patch.object(builders.BUILDERS['folder'], '_generate_examples',
                           broken):
      with self.assertRaises(Exception):
        builders.build('folder', src, self.data_dir, 'flat', overwrite=True,
                       log=lambda _: None)
    r = builders.info('folder', 'flat', self.data_dir)
    self.assertEqual(r['num_examples'], {'train': 3})
    self.assertLen(_read_all(r['name'], self.data_dir, 'train'), 3)
    self.assertEqual([d for d in os.listdir(self.data_dir)
                      if d.startswith('.staging') or d.endswith('.replaced')],
                     [])
    # `~` in data_dir is the home directory.
    with mock.patch.dict(os.environ, {'HOME': self.tmp}):
      r = builders.info('folder', 'flat', os.path.join(
          '~', os.path.relpath(self.data_dir, self.tmp)))
    self.assertEqual(r['num_examples'], {'train': 3})


def _fake_imagenet(root: str, names) -> dict[str, bytes]:
  """A few ImageNet-style files; returns relative path -> bytes."""
  files = {}
  for k, label in enumerate((0, 1, 999)):
    wnid = names[label]
    for j in range(2):
      rel = f'train/{wnid}/{wnid}_{j}.JPEG'
      files[rel] = _encode(_pixels(20 + 2 * k + j), 'JPEG')
    files[f'val/{wnid}/ILSVRC2012_val_{k:08d}.JPEG'] = _encode(
        _pixels(40 + k), 'JPEG')
  # A CMYK JPEG, as a few ImageNet files are: stored converted to RGB.
  files[f'train/{names[1]}/{names[1]}_cmyk.JPEG'] = _encode(
      _pixels(50), 'JPEG', mode='CMYK')
  for rel, data in files.items():
    _write(os.path.join(root, rel), data)
  return files


def _write_lists(folder: str, lines: dict[str, list[str]]) -> None:
  for split, entries in lines.items():
    _write(os.path.join(folder, f'ImageNet_LT_{split}.txt'),
           ('\n'.join(entries) + '\n').encode())


class ImagenetLtTest(_TempDirClass):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.names = builders.imagenet_class_names()
    cls.root = os.path.join(cls.tmp, 'imagenet')
    cls.files = _fake_imagenet(cls.root, cls.names)
    n0, n1, n9 = cls.names[0], cls.names[1], cls.names[999]
    cls.lists = {
        'train': [f'train/{n9}/{n9}_1.JPEG 999', f'train/{n0}/{n0}_0.JPEG 0',
                  f'train/{n1}/{n1}_cmyk.JPEG 1', f'train/{n1}/{n1}_0.JPEG 1'],
        'val': [f'train/{n0}/{n0}_1.JPEG 0', f'train/{n9}/{n9}_0.JPEG 999'],
        'test': [f'val/{n1}/ILSVRC2012_val_00000001.JPEG 1',
                 f'val/{n0}/ILSVRC2012_val_00000000.JPEG 0',
                 f'val/{n9}/ILSVRC2012_val_00000002.JPEG 999'],
    }
    cls.list_dir = os.path.join(cls.tmp, 'lists')
    _write_lists(cls.list_dir, cls.lists)
    cls.data_dir = os.path.join(cls.tmp, 'data')
    cls.result = builders.build('imagenet_lt', cls.root, cls.data_dir,
                                lists=cls.list_dir, log=lambda _: None)

  def test_info(self):
    r = self.result
    self.assertEqual(r['name'], 'gendd_imagenet_lt/default')
    self.assertEqual(r['num_classes'], 1000)
    self.assertEqual(r['class_names'][:2], ['n01440764', 'n01443537'])
    self.assertEqual(r['num_examples'], {'train': 4, 'val': 2, 'test': 3})
    self.assertEqual(r['skipped'], {'train': 0, 'val': 0, 'test': 0})
    self.assertEqual(r['converted'], {'train': 1, 'val': 0, 'test': 0})

  def test_examples_follow_the_lists(self):
    for split, lines in self.lists.items():
      raw = _read_all('gendd_imagenet_lt/default', self.data_dir, split,
                      raw=True)
      decoded = _read_all('gendd_imagenet_lt/default', self.data_dir, split)
      self.assertEqual([int(e['id']) for e in raw], list(range(len(lines))))
      for line, r, d in zip(lines, raw, decoded):
        path, label = line.split()
        self.assertEqual(r['file_name'].decode(), path)
        self.assertEqual(int(r['label']), int(label))
        source = self.files[path]
        np.testing.assert_array_equal(d['image'], _decode_rgb(source))
        if 'cmyk' not in path:
          self.assertEqual(r['image'], source)

  def test_missing_images_are_one_clear_error(self):
    lists = os.path.join(self.tmp, 'lists_missing')
    n0 = self.names[0]
    bad = dict(self.lists)
    bad['train'] = self.lists['train'] + [
        f'train/{n0}/{n0}_gone{k}.JPEG 0' for k in range(7)]
    _write_lists(lists, bad)
    with self.assertRaisesRegex(
        builders.BuildError,
        r'ImageNet_LT_train.txt names 7 image\(s\) missing under .*: '
        r'train/n01440764/n01440764_gone0.JPEG, .*gone4.JPEG, \.\.\.$'):
      builders.build('imagenet_lt', self.root, self.data_dir, 'missing',
                     lists=lists, log=lambda _: None)
    self.assertFalse(builders.is_built('imagenet_lt', 'missing',
                                       self.data_dir))

  def test_bad_lists(self):
    lists = os.path.join(self.tmp, 'lists_partial')
    _write_lists(lists, {'train': self.lists['train']})
    with self.assertRaisesRegex(builders.BuildError,
                                'ImageNet_LT_val.txt, ImageNet_LT_test.txt'):
      builders.create_plan('imagenet_lt', self.root, lists)
    wrong = os.path.join(self.tmp, 'lists_wrong')
    n0 = self.names[0]
    _write_lists(wrong, dict(self.lists, val=[f'train/{n0}/{n0}_1.JPEG 5']))
    with self.assertRaisesRegex(builders.BuildError, 'not the label'):
      builders.create_plan('imagenet_lt', self.root, wrong)
    garbled = os.path.join(self.tmp, 'lists_garbled')
    _write_lists(garbled, dict(self.lists, test=['just-a-path.JPEG']))
    with self.assertRaisesRegex(builders.BuildError, 'line 1'):
      builders.create_plan('imagenet_lt', self.root, garbled)


def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


class UnlabeledTest(_TempDirClass):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    shards = os.path.join(cls.tmp, 'shards')
    cls.images = {
        'shard-00000.tar/000': _encode(_pixels(60), 'JPEG'),
        'shard-00000.tar/001': _encode(_pixels(61), 'PNG'),
        'shard-00001.tar/sub/003': _encode(_pixels(63), 'JPEG'),
        'shard-00001.tar/004': _encode(_pixels(64), 'JPEG', mode='L'),
    }
    im = cls.images
    _tar(os.path.join(shards, 'shard-00000.tar'), [
        ('000.jpg', im['shard-00000.tar/000']), ('000.txt', b'a caption'),
        ('000.json', b'{}'), ('001.png', im['shard-00000.tar/001']),
        ('002.jpg', CORRUPT), ('002.txt', b'caption of a corrupt image')])
    _tar(os.path.join(shards, 'shard-00001.tar'), [
        ('sub/003.jpeg', im['shard-00001.tar/sub/003']),
        ('sub/003.txt', b'x'), ('004.JPG', im['shard-00001.tar/004'])])
    _write(os.path.join(shards, 'README.md'), b'not a shard')
    cls.shards = shards
    cls.data_dir = os.path.join(cls.tmp, 'data')
    cls.result = builders.build('unlabeled', os.path.join(shards, '*.tar'),
                                cls.data_dir, 'cc3m', log=lambda _: None)

  def test_counts_ids_keys_and_skipped(self):
    r = self.result
    self.assertIsNone(r['num_classes'])
    self.assertEqual(r['num_examples'], {'train': 4})
    self.assertEqual(r['skipped'], {'train': 1})
    self.assertStartsWith(r['skipped_examples']['train'][0],
                          'shard-00000.tar/002 (')
    raw = _read_all('gendd_unlabeled_images/cc3m', self.data_dir, 'train',
                    raw=True)
    self.assertEqual([int(e['id']) for e in raw], [0, 1, 3, 4])
    self.assertEqual([e['key'].decode() for e in raw], list(self.images))
    self.assertNotIn('label', raw[0])

  def test_pixels_and_jpeg_bytes(self):
    raw = _read_all('gendd_unlabeled_images/cc3m', self.data_dir, 'train',
                    raw=True)
    decoded = _read_all('gendd_unlabeled_images/cc3m', self.data_dir,
                        'train')
    for r, d in zip(raw, decoded):
      source = self.images[r['key'].decode()]
      np.testing.assert_array_equal(d['image'], _decode_rgb(source))
    self.assertEqual(raw[0]['image'], self.images['shard-00000.tar/000'])
    self.assertEqual(raw[2]['image'], self.images['shard-00001.tar/sub/003'])
    np.testing.assert_array_equal(decoded[1]['image'], _pixels(61))

  def test_truncated_shard_is_noted_and_the_next_shard_read(self):
    shards = os.path.join(self.tmp, 'truncated')
    first = os.path.join(shards, 'a.tar')
    _tar(first, [('0.jpg', _encode(_pixels(65), 'JPEG')),
                 ('1.png', _encode(_pixels(66, (40, 40, 3)), 'PNG'))])
    with open(first, 'rb') as f:
      data = f.read()
    _write(first, data[:len(data) // 2])  # Cut inside the second member.
    _tar(os.path.join(shards, 'b.tar'),
         [('2.jpg', _encode(_pixels(67), 'JPEG'))])
    notes = []
    examples = list(builders.shard_examples(
        builders.shard_paths(shards), notes))
    self.assertEqual([(e.id, e.source) for e in examples],
                     [(0, 'a.tar/0'), (1, 'b.tar/2')])
    self.assertLen(notes, 1)
    self.assertStartsWith(notes[0], 'a.tar: unreadable after 1 images')

  def test_folder_src_and_bad_shards(self):
    plan = builders.create_plan('unlabeled', self.shards)
    self.assertLen([e for e in plan.splits['train']()], 5)
    with self.assertRaisesRegex(builders.BuildError, 'no tar shards match'):
      builders.create_plan('unlabeled', os.path.join(self.shards, '*.tgz'))
    fake = _write(os.path.join(self.tmp, 'fake', 'x.tar'), b'plain text')
    with self.assertRaisesRegex(builders.BuildError, 'not tar archives'):
      builders.create_plan('unlabeled', fake)


class NpzTest(_TempDirClass):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.arrays = dict(
        train_images=_pixels(70, (5, 8, 7, 3)),
        train_labels=np.array([2, 0, 1, 2, 0]),
        test_images=_pixels(71, (3, 8, 7, 3)),
        test_labels=np.array([1, 1, 0], np.int32),
        class_names=np.array(['ant', 'bee', 'cow']))
    cls.src = os.path.join(cls.tmp, 'Toy-Set.npz')
    np.savez(cls.src, **cls.arrays)
    cls.data_dir = os.path.join(cls.tmp, 'data')
    cls.result = builders.build('npz', cls.src, cls.data_dir,
                                log=lambda _: None)

  def test_exact_pixels_labels_and_ids(self):
    r = self.result
    self.assertEqual(r['name'], 'gendd_npz_images/toy_set')
    self.assertEqual(r['class_names'], ['ant', 'bee', 'cow'])
    self.assertEqual(r['num_examples'], {'train': 5, 'test': 3})
    for split in ('train', 'test'):
      got = _read_all(r['name'], self.data_dir, split)
      np.testing.assert_array_equal(np.stack([e['image'] for e in got]),
                                    self.arrays[f'{split}_images'])
      np.testing.assert_array_equal([e['label'] for e in got],
                                    self.arrays[f'{split}_labels'])
      self.assertEqual([int(e['id']) for e in got],
                       list(range(len(got))))
    ds_info = tfds.builder_from_directory(r['dir']).info
    self.assertEqual(ds_info.features['image'].shape, (8, 7, 3))

  def test_grayscale_single_split(self):
    src = os.path.join(self.tmp, 'gray.npz')
    images = _pixels(72, (4, 5, 6))
    np.savez(src, images=images, labels=np.array([0, 3, 1, 0]))
    r = builders.build('npz', src, self.data_dir, log=lambda _: None)
    self.assertEqual(r['class_names'], ['0', '1', '2', '3'])
    got = _read_all(r['name'], self.data_dir, 'train')
    np.testing.assert_array_equal(np.stack([e['image'] for e in got]),
                                  images[..., None])

  def test_bad_arrays(self):
    cases = {
        'float': (dict(images=np.zeros((2, 4, 4, 3), np.float32),
                       labels=np.zeros(2, int)), 'must be uint8'),
        'length': (dict(images=np.zeros((2, 4, 4, 3), np.uint8),
                        labels=np.zeros(3, int)), '2 images but labels'),
        'nolabels': (dict(train_images=np.zeros((2, 4, 4, 3), np.uint8)),
                     'no `train_labels`'),
        'channels': (dict(images=np.zeros((2, 4, 4, 2), np.uint8),
                          labels=np.zeros(2, int)), 'C 1 or 3'),
    }
    for name, (arrays, message) in cases.items():
      src = os.path.join(self.tmp, f'bad_{name}.npz')
      np.savez(src, **arrays)
      with self.assertRaisesRegex(builders.BuildError, message, msg=name):
        builders.create_plan('npz', src)


class CommandTest(_TempDirClass):
  """Bad input: exit status 2, one `error:` line, nothing built."""

  def _run(self, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = common.call(build_dataset.main, list(argv))
    return rc, out.getvalue(), err.getvalue()

  def _assert_error(self, kind: str, src: str, message: str, *extra: str):
    data_dir = os.path.join(self.tmp, 'data')
    rc, _, err = self._run(kind, '--src', src, '--data_dir', data_dir,
                           '--name', 'x', *extra)
    self.assertEqual(rc, 2, err)
    lines = err.strip().splitlines()
    self.assertLen(lines, 1, err)
    self.assertStartsWith(lines[0], 'error: ')
    self.assertIn(message, lines[0])
    if kind in builders.KINDS:
      self.assertFalse(builders.is_built(kind, 'x', data_dir))
      with self.assertRaisesRegex(builders.BuildError, 'is not built'):
        builders.info(kind, 'x', data_dir)

  def test_imagenet2012_manual_dir_is_checked_first(self):
    tars = os.path.join(self.tmp, 'tars')
    os.makedirs(tars)
    with open(os.path.join(tars, 'ILSVRC2012_img_train.tar'), 'wb') as f:
      f.write(b'x' * 10)
    rc, _, err = self._run('tfds', '--name', 'imagenet2012', '--src', tars,
                           '--data_dir', os.path.join(self.tmp, 'data'))
    self.assertEqual(rc, 2)
    self.assertLen(err.strip().splitlines(), 1, err)
    self.assertIn('ILSVRC2012_img_val.tar', err)
    self.assertNotIn('ILSVRC2012_img_train.tar is', err)
    rc, _, err = self._run('tfds', '--data_dir', self.tmp)
    self.assertEqual(rc, 2)
    self.assertIn('needs --name', err)

  def test_bad_inputs(self):
    empty = os.path.join(self.tmp, 'empty')
    os.makedirs(empty)
    no_images = os.path.join(self.tmp, 'no_images')
    _write(os.path.join(no_images, 'cat', 'notes.txt'), b'text')
    self._assert_error('nosuchkind', empty, "unknown dataset kind 'nosuchkind'")
    self._assert_error('folder', os.path.join(self.tmp, 'absent'),
                       'does not exist')
    self._assert_error('folder', empty, 'no class sub-folders')
    self._assert_error('folder', no_images, 'no images')
    self._assert_error('imagenet_lt', os.path.join(self.tmp, 'absent'),
                       'ImageNet folder')
    self._assert_error('imagenet_lt', empty, 'ImageNet_LT_train.txt')
    self._assert_error('unlabeled', os.path.join(empty, '*.tar'),
                       'no tar shards match')
    self._assert_error('npz', os.path.join(empty, 'a.npz'), 'does not exist')
    self._assert_error('folder', empty, 'invalid dataset name', '--name',
                       'a/b')

  def test_all_images_corrupt_leaves_nothing(self):
    src = os.path.join(self.tmp, 'corrupt')
    _write(os.path.join(src, 'cat', 'a.jpg'), CORRUPT)
    self._assert_error('folder', src, 'no readable image')
    leftovers = []
    for root, dirs, files in os.walk(os.path.join(self.tmp, 'data')):
      leftovers += files + [d for d in dirs if 'incomplete' in d]
    self.assertEqual(leftovers, [])

  def test_success_and_exit_status_of_the_module(self):
    src = os.path.join(self.tmp, 'ok.npz')
    np.savez(src, images=_pixels(80, (2, 3, 3, 3)), labels=np.array([0, 1]))
    data_dir = os.path.join(self.tmp, 'ok_data')
    rc, out, _ = self._run('npz', '--src', src, '--data_dir', data_dir)
    self.assertEqual(rc, 0)
    self.assertIn("tfds.data_source('gendd_npz_images/ok'", out)
    proc = subprocess.run(
        [sys.executable, '-m', 'gendd_jax.cli.build_dataset', 'bogus', '--src',
         src, '--data_dir', data_dir], cwd=_ROOT, capture_output=True,
        text=True, timeout=120, check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(proc.stderr.strip().splitlines()[-1],
                     "error: unknown dataset kind 'bogus'; available: "
                     'folder, imagenet_lt, unlabeled, npz')


_NO_TF_SCRIPT = r'''
import json, sys
import tensorflow_datasets as tfds
from gendd_jax.data import builders
tfds.disable_progress_bar()
data_dir, folder, npz, shard = sys.argv[1:]
quiet = lambda _: None
builders.build('folder', folder, data_dir, 'f', log=quiet)
builders.build('npz', npz, data_dir, 'n', log=quiet)
builders.build('unlabeled', shard, data_dir, 'u', log=quiet)
out = {'tf_after_build': 'tensorflow' in sys.modules}
for kind, name, split in [('folder', 'f', 'train'), ('npz', 'n', 'test'),
                          ('unlabeled', 'u', 'train')]:
  src = tfds.data_source(builders.dataset_name(kind, name),
                         data_dir=data_dir, split=split)
  again = builders.load_source(kind, name, data_dir, split)
  out[kind] = [len(src), list(src[0]['image'].shape), int(again[0]['id'])]
out['tf_after_read'] = 'tensorflow' in sys.modules
print(json.dumps(out))
'''


class NoTensorflowTest(_TempDirClass):

  def test_build_and_read_without_tensorflow(self):
    folder = os.path.join(self.tmp, 'folder')
    _write(os.path.join(folder, 'a', 'x.jpg'), _encode(_pixels(90), 'JPEG'))
    npz = os.path.join(self.tmp, 'n.npz')
    np.savez(npz, test_images=_pixels(91, (2, 4, 4, 3)),
             test_labels=np.array([0, 1]))
    shard = os.path.join(self.tmp, 'u.tar')
    _tar(shard, [('k.jpg', _encode(_pixels(92), 'JPEG'))])
    data_dir = os.path.join(self.tmp, 'data')
    proc = subprocess.run(
        [sys.executable, '-c', _NO_TF_SCRIPT, data_dir, folder, npz, shard],
        cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(out['folder'], [1, [6, 5, 3], 0])
    self.assertEqual(out['npz'], [2, [4, 4, 3], 0])
    self.assertEqual(out['unlabeled'], [1, [6, 5, 3], 0])
    self.assertFalse(out['tf_after_build'])
    self.assertFalse(out['tf_after_read'])


class OrderedMapTest(absltest.TestCase):

  def test_threads_keep_the_order(self):
    got = list(builders.ordered_map(lambda x: x * x, iter(range(50)),
                                    workers=3, window=4))
    self.assertEqual(got, [x * x for x in range(50)])


class ImagenetManualDirTest(_TempDirClass):

  def test_names_the_missing_tar(self):
    d = os.path.join(self.tmp, 'manual')
    os.makedirs(d)
    train, val = builders.IMAGENET_TARS
    with self.assertRaisesRegex(builders.BuildError,
                                f'lacks {train} and {val}'):
      builders.check_imagenet_manual_dir(d)
    _write(os.path.join(d, train), b'x')
    with self.assertRaisesRegex(builders.BuildError, f'lacks {val} '):
      builders.check_imagenet_manual_dir(d)
    _write(os.path.join(d, val), b'')
    with self.assertRaisesRegex(builders.BuildError, f'has an empty {val}'):
      builders.check_imagenet_manual_dir(d)
    _write(os.path.join(d, val), b'x')
    self.assertEqual(builders.check_imagenet_manual_dir(d), d)
    with self.assertRaisesRegex(builders.BuildError, 'does not exist'):
      builders.check_imagenet_manual_dir(os.path.join(d, 'nope'))


if __name__ == '__main__':
  absltest.main()
