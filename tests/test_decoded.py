"""Training splits served from memory (`data/decoded.py`): the path is taken
under `data.in_memory_limit_mb` and not over it, the batches and iterator
states equal the grain stream's bit for bit (every view, mixup, skipped
records, several processes), and a killed run resumes exactly, on either
path."""

import io
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from gendd_jax import config_lib
from gendd_jax import data as data_lib
from gendd_jax import train
from gendd_jax.data import augment
from gendd_jax.data import builders
from gendd_jax.data import decoded
from gendd_jax.data import streams
import testing

_TMP = None


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_decoded_')
  src = testing.write_class_folder(os.path.join(_TMP.name, 'src'),
                                   per_split=(('train', 12), ('val', 4)))
  builders.build('folder', src, os.path.join(_TMP.name, 'tfds'), 'tiny',
                 log=lambda *a, **k: None)


def tearDownModule():
  _TMP.cleanup()


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


_BROKEN = (4, 17)


def _source(n=23):
  """PNG records of mixed sizes (some not the training size), two of them
  undecodable."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    h, w = (16, 16) if i % 3 else (20, 24)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out.append(dict(image=b'broken' if i in _BROKEN else _png(image),
                    label=np.int64(i % 3), id=np.int64(100 + i)))
  return out


def _data(**overrides):
  c = config_lib.image_data('folder:tiny', image_size=16, augment='regular',
                            batch_size=6, eval_batch_size=8,
                            eval_split='val')
  c.data_dir = os.path.join(_TMP.name, 'tfds')
  c.num_threads, c.prefetch = 2, 8
  for k, v in overrides.items():
    c[k] = v
  return c


def _streams(view_kind, mix, p, count, batch=4, seed=3, source=None):
  """The grain stream and the in-memory stream of one process."""
  source = source or _source()
  view = augment.train_transform(view_kind, 16)
  batch_fn = None
  if mix:
    batch_fn = streams.mix_transform(
        config_lib.image_data('x:y', mixup=0.4, cutmix=1.0,
                              label_smoothing=0.1), 3)
  grain_stream = streams.TrainStream(
      source, batch, seed, streams.example_fn(view), batch_fn,
      process_index=p, process_count=count,
      read=streams.ReadSettings(num_threads=2, prefetch=8))
  data, _ = decoded.decode_slice(source, 1 << 30, p, count)
  memory_stream = decoded.DecodedStream(
      data, len(source), batch, seed, view, batch_fn, process_index=p,
      process_count=count)
  return grain_stream, memory_stream


class SameStreamTest(parameterized.TestCase):

  @parameterized.product(view=('none', 'cifar', 'regular', 'rand'),
                         mix=(False, True), count=(1, 3))
  def test_equal_to_the_grain_stream(self, view, mix, count):
    for p in range(count):
      a, b = _streams(view, mix, p, count, batch=6)
      self.assertEqual(a.steps_per_epoch, b.steps_per_epoch)
      for step in range(3 * a.steps_per_epoch + 1):  # Past epoch ends.
        x, y = next(a), next(b)
        self.assertEqual(list(x), list(y))
        for k in x:
          self.assertEqual(x[k].dtype, y[k].dtype, k)
          np.testing.assert_array_equal(x[k], y[k], err_msg=f'{k} {step}')
        self.assertEqual(a.get_state(), b.get_state())

  def test_processes_read_disjoint_slices_every_record_once(self):
    count, seen = 3, []
    for p in range(count):
      _, b = _streams('none', False, p, count, batch=6)
      for _ in range(b.steps_per_epoch):
        seen.extend(next(b)['id'].tolist())
      # Only this process's records are held.
      self.assertEqual(b.shard_size, len(range(p, 23, count)))
    # 21 decodable records; 3 steps of 2 per process read 18 of them, none
    # twice and none broken.
    self.assertLen(seen, 18)
    self.assertLen(set(seen), 18)
    self.assertFalse(set(seen) & {100 + i for i in _BROKEN})

  def test_state_carries_over_between_the_paths(self):
    a, b = _streams('rand', True, 0, 1)
    for _ in range(7):
      next(a)
    b.set_state(a.get_state())  # grain's state, in memory.
    want = next(a)
    np.testing.assert_array_equal(next(b)['image'], want['image'])
    c, _ = _streams('rand', True, 0, 1)
    c.set_state(b.get_state())  # And back.
    np.testing.assert_array_equal(next(c)['image'], next(a)['image'])

  def test_foreign_state_is_refused(self):
    _, b = _streams('none', False, 0, 1)
    for state in ({'workers_state': {}, 'iterations_to_skip': {}},
                  {'parent': {'next_index': 3}, 'index_for_rng': 1},
                  {'next_index': -1}):
      with self.assertRaisesRegex(streams.PipelineError,
                                  'in_memory_limit_mb=0'):
        b.set_state(state)

  def test_nothing_decodable_is_one_error(self):
    source = [dict(image=b'x', label=np.int64(0))] * 8
    with self.assertRaisesRegex(streams.PipelineError, 'none of the 8'):
      decoded.decode_slice(source, 1 << 20)


class PathChoiceTest(absltest.TestCase):

  def test_in_memory_under_the_limit_streamed_over_it(self):
    # 36 images of 40 x 48 x 3: 0.2 MB decoded.
    ds = data_lib.open_dataset(_data(), seed=0)
    with self.assertLogs(level='INFO') as logs:
      self.assertIsInstance(ds.train.chosen, decoded.DecodedStream)
    self.assertTrue(any('36 images decoded into memory once (0.2 MB' in line
                        for line in logs.output), logs.output)
    for limit, why in ((0.1, 'decoded size about 0.2 MB is over'),
                       (0, 'data.in_memory_limit_mb=0')):
      ds = data_lib.open_dataset(_data(in_memory_limit_mb=limit), seed=0)
      with self.assertLogs(level='INFO') as logs:
        self.assertIsInstance(ds.train.chosen, streams.TrainStream)
      self.assertTrue(any(why in line for line in logs.output), logs.output)

  def test_decoded_only_when_training_reads(self):
    calls = []
    original = decoded.decode_slice

    def counted(*args, **kwargs):
      calls.append(1)
      return original(*args, **kwargs)
    with mock.patch.object(decoded, 'decode_slice', counted):
      ds = data_lib.open_dataset(_data(), seed=0)
      self.assertEqual(ds.train.steps_per_epoch, 36 // 6)
      self.assertLen(list(ds.eval_batches()), 2)  # 12 images, batch 8.
      self.assertEmpty(calls)
      next(ds.train)
      ds.train.get_state()
      next(ds.train)
    self.assertLen(calls, 1)

  def test_limit_counted_while_decoding(self):
    source = _source()  # The first image is 20 x 24, the others 16 x 16.
    data, size = decoded.decode_slice(source, 1 << 20)
    self.assertEqual(size, data.nbytes)
    # 8 decodable images of 20 x 24, 13 of 16 x 16, 12 bytes of id and label
    # each.
    self.assertEqual(size, 8 * 20 * 24 * 3 + 13 * 16 * 16 * 3 + 21 * 12)
    # The first image's estimate passes; the count does not.
    small = [dict(image=_png(np.zeros((4, 4, 3), np.uint8)),
                  label=np.int64(0))] + source[1:] * 30
    self.assertLess(len(small) * (4 * 4 * 3 + 12), 50000)
    data, size = decoded.decode_slice(small, 50000)
    self.assertIsNone(data)
    self.assertGreater(size, 50000)

  def test_bad_limit_is_one_error(self):
    with self.assertRaisesRegex(data_lib.DataError, 'in_memory_limit_mb'):
      data_lib.open_dataset(_data(in_memory_limit_mb=-1), seed=0)
    for bad in ('big', None, True):
      with self.assertRaisesRegex(streams.PipelineError,
                                  'in_memory_limit_mb must be a number'):
        streams.in_memory_limit_bytes({'in_memory_limit_mb': bad})


def _config(limit):
  c = testing.load_config('digits', None)
  c.data = _data(in_memory_limit_mb=limit, mixup=0.2, cutmix=1.0,
                 label_smoothing=0.1)
  c.stage = 'teacher'
  c.stages.teacher.epochs = 3.0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 5
  c.eval_every_steps = 0
  return c


def _params(workdir):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'export', 'weights'))['model']['params']


class ResumeTest(absltest.TestCase):

  def test_killed_run_resumes_bit_exact_on_either_path(self):
    def run(name, limit, killed_limit=None):
      workdir = os.path.join(_TMP.name, name)
      if killed_limit is not None:
        with testing.killed_at_batch(decoded.DecodedStream, 10):
          with self.assertRaises(KeyboardInterrupt):
            train.train_and_evaluate(_config(killed_limit), workdir,
                                     quiet=True)
      res = train.train_and_evaluate(_config(limit), workdir, quiet=True)
      self.assertEqual(res['steps'], 18)
      return _params(workdir)
    want = run('streamed', 0)
    for got in (run('memory', 64), run('memory_killed', 64, 64),
                run('memory_killed_streamed', 0, 64)):
      for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == '__main__':
  absltest.main()
