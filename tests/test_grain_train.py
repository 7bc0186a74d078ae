"""Training end to end on a built TFDS dataset through grain: augmentation,
mixup/cutmix soft labels, precomputed-free teacher stage, and a resumed run
that continues the exact example stream (bit-for-bit on CPU)."""

import functools
import io
import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from gendd_jax.data import builders
from gendd_jax import config_lib
from gendd_jax import data as data_lib
from gendd_jax.data import streams as ip
from gendd_jax import train
from gendd_jax.cli import common
from gendd_jax.cli import evaluate
from gendd_jax import errors
import testing

_TMP = None


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_grain_')
  src = testing.write_class_folder(os.path.join(_TMP.name, 'src'))
  with open(os.path.join(src, 'train', 'class0', 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg')
  builders.build('folder', src, os.path.join(_TMP.name, 'tfds'), 'tiny',
                 log=lambda *a, **k: None)


def tearDownModule():
  _TMP.cleanup()


def _config(**data):
  c = config_lib.cifar100('resnet8', 'resnet8')
  c.data = config_lib.image_data('folder:tiny', image_size=32,
                                 augment='regular', batch_size=6,
                                 eval_batch_size=8, mixup=0.2, cutmix=1.0,
                                 label_smoothing=0.1, eval_split='val')
  c.data.data_dir = os.path.join(_TMP.name, 'tfds')
  c.data.num_threads = 2
  c.data.prefetch = 8
  c.data.in_memory_limit_mb = 0  # grain (the memory path: test_decoded.py).
  for k, v in data.items():
    c.data[k] = v
  c.stage = 'teacher'
  c.stages.teacher.epochs = 3.0
  c.stages.teacher.decay_epochs = (2.0,)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 5
  return c


@functools.lru_cache(maxsize=None)
def _run_a():
  """A teacher trained once per process: `(workdir, results)`."""
  workdir = os.path.join(_TMP.name, 'a')
  return workdir, train.train_and_evaluate(_config(), workdir, quiet=True)


def _params(workdir):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'export', 'weights'))['model']['params']


class GrainTrainTest(absltest.TestCase):

  def test_batches_have_soft_labels_and_normalised_images(self):
    ds = data_lib.open_dataset(_config().data, seed=0)
    self.assertEqual(ds.info['num_classes'], 3)
    self.assertEqual(ds.train.steps_per_epoch, 30 // 6)  # 30 decodable.
    b = next(ds.train)
    self.assertEqual(b['image'].shape, (6, 32, 32, 3))
    self.assertEqual(b['label'].shape, (6, 3))
    np.testing.assert_allclose(b['label'].sum(-1), 1.0, rtol=1e-6)
    self.assertLess(abs(float(b['image'].mean())), 3.0)
    evals = list(ds.eval_batches())
    ids = np.concatenate([e['id'][e['valid'] > 0] for e in evals])
    self.assertEqual(sorted(ids.tolist()), list(range(12)))

  def test_teacher_resumes_on_the_exact_stream(self):
    dir_a, res_a = _run_a()
    self.assertEqual(res_a['steps'], 15)
    # Measured: 100% (12 of 12); chance is 33.3% (3 classes).
    self.assertGreaterEqual(res_a['accuracy']['acc'], 75.0)
    self.assertLen(res_a['labels'], 12)

    dir_b = os.path.join(_TMP.name, 'b')
    with testing.killed_at_batch(ip.TrainStream, 10):
      with self.assertRaises(KeyboardInterrupt):
        train.train_and_evaluate(_config(), dir_b, quiet=True)
    res_b = train.train_and_evaluate(_config(), dir_b, quiet=True)
    self.assertEqual(res_b['steps'], 15)
    for a, b in zip(jax.tree.leaves(_params(dir_a)),
                    jax.tree.leaves(_params(dir_b))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_evaluate_on_another_dataset_reads_only_its_split(self):
    # A user's labelled image folder, built as one split; the evaluate
    # command opens that split alone (not the config's dataset at all).
    src = testing.write_class_folder(os.path.join(_TMP.name, 'other_src'),
                                     per_split=(('train', 5),), seed=3)
    data_dir = os.path.join(_TMP.name, 'tfds')
    builders.build('folder', src, data_dir, 'other', log=lambda *a: None)
    workdir, res = _run_a()
    out = os.path.join(_TMP.name, 'other_eval.json')
    argv = [f'--checkpoint={workdir}/export', f'--data_dir={data_dir}',
            '--data=folder:other', '--split=train', f'--out={out}']
    with mock.patch.object(ip, 'open_source', wraps=ip.open_source) as spy:
      self.assertEqual(common.call(evaluate.main, argv), 0)
    self.assertEqual([c.args[:2] for c in spy.call_args_list],
                     [('folder:other', 'train')])
    with open(out) as f:
      got = json.load(f)['logits']
    self.assertEqual(got['images'], 15)
    # The same images are as easy as the training ones (chance: 33%).
    self.assertGreaterEqual(got['top1'], 60.0)
    # The config's own split through the same path gives the training
    # run's accuracy.
    self.assertEqual(common.call(evaluate.main, argv[:2] + [f'--out={out}']),
                     0)
    with open(out) as f:
      self.assertAlmostEqual(json.load(f)['logits']['top1'],
                             res['accuracy']['acc'], places=4)
    # A split the dataset does not have: one error, non-zero status.
    self.assertNotEqual(
        common.call(evaluate.main, argv[:3] + ['--split=test']), 0)

  def test_crop_scale_reaches_the_training_transform(self):
    seen = []
    original = ip.augment.train_transform

    def recording(*args, **kwargs):
      seen.append(kwargs.get('crop_scale'))
      return original(*args, **kwargs)
    c = _config()
    with mock.patch.object(ip.augment, 'train_transform', recording):
      for scale in (0.6, 0.08):
        c.data.crop_scale = scale
        data_lib.open_dataset(c.data, c.seed)
    self.assertEqual(seen, [0.6, 0.08])

  def test_missing_or_unknown_dataset(self):
    c = _config(name='folder:nope')
    with self.assertRaisesRegex(data_lib.DataError, 'not built'):
      train.train_and_evaluate(c, os.path.join(_TMP.name, 'missing'),
                               quiet=True)
    c = _config(name='imagenet2012')
    with self.assertRaisesRegex(data_lib.DataError, 'unknown dataset'):
      train.train_and_evaluate(c, os.path.join(_TMP.name, 'bad'),
                               quiet=True)


if __name__ == '__main__':
  absltest.main()


class MockCatalogueTest(absltest.TestCase):
  """`tfds:` catalogue datasets through the same pipeline, on
  `tfds.testing.mock_data` (random image sizes, no files)."""

  def test_mock_imagenet2012_batches(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    c = _config(name='tfds:imagenet2012', eval_split='validation',
                mixup=0.0, cutmix=0.0, label_smoothing=0.0, augment='rand')
    with tfds.testing.mock_data(num_examples=12):
      ds = data_lib.open_dataset(c.data, seed=0)
      self.assertEqual(ds.info['num_classes'], 1000)
      b = next(ds.train)
      evals = list(ds.eval_batches())
    self.assertEqual(b['image'].shape, (6, 32, 32, 3))
    self.assertEqual(b['label'].shape, (6,))
    self.assertEqual(sum(int(e['valid'].sum()) for e in evals), 12)


class UnlabelledTest(absltest.TestCase):

  def test_unlabelled_shards_train_without_labels_and_eval_elsewhere(self):
    import tarfile  # pylint: disable=g-import-not-at-top
    shard = os.path.join(_TMP.name, 'shard-0.tar')
    with tarfile.open(shard, 'w') as tar:
      for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.full((36, 36, 3), 20 * i, np.uint8)).save(
            buf, format='JPEG')
        info = tarfile.TarInfo(f'{i:04d}.jpg')
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    data_dir = os.path.join(_TMP.name, 'tfds')
    builders.build('unlabeled', shard, data_dir, 'cc', log=lambda *a: None)
    c = _config(name='unlabeled:cc', mixup=0.0, cutmix=0.0,
                label_smoothing=0.0, batch_size=4)
    with self.assertRaisesRegex(data_lib.DataError, 'set data.eval_name'):
      data_lib.open_dataset(c.data, seed=0)
    c.data.eval_name = 'folder:tiny'
    ds = data_lib.open_dataset(c.data, seed=0)
    self.assertFalse(ds.info['labelled'])
    self.assertEqual(ds.info['num_classes'], 3)
    self.assertNotIn('label', next(ds.train))
    self.assertIn('label', next(iter(ds.eval_batches())))
    with self.assertRaisesRegex(errors.ConfigError, 'needs labels'):
      train.train_and_evaluate(c, os.path.join(_TMP.name, 'unlab'),
                               quiet=True)


_WORKERS_SCRIPT = r'''
import json, sys
sys.path.insert(0, {root!r})
from absl import app


def main(argv):
  del argv
  from gendd_jax import config_lib, data as data_lib
  c = config_lib.image_data('folder:tiny', image_size=32, augment='regular',
                            batch_size=4, eval_batch_size=8, mixup=0.2,
                            cutmix=1.0, label_smoothing=0.1,
                            eval_split='val')
  c.data_dir, c.num_threads, c.prefetch, c.num_workers = {data_dir!r}, 1, 4, 2
  c.in_memory_limit_mb = 0
  ds = data_lib.open_dataset(c, seed=0)
  ids = [next(ds.train)['id'].tolist() for _ in range(3)]
  state = ds.train.get_state()
  want = next(ds.train)['id'].tolist()
  again = data_lib.open_dataset(c, seed=0)
  again.train.set_state(state)
  print('RESULT', json.dumps(dict(ids=ids, want=want,
                                  got=next(again.train)['id'].tolist())))


if __name__ == '__main__':
  app.run(main)
'''


class WorkerProcessesTest(absltest.TestCase):

  def test_worker_processes_stream_and_resume(self):
    import json  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(_TMP.name, 'workers.py')
    with open(script, 'w') as f:
      f.write(_WORKERS_SCRIPT.format(
          root=root, data_dir=os.path.join(_TMP.name, 'tfds')))
    proc = subprocess.run([sys.executable, script], capture_output=True,
                          text=True, timeout=300,
                          env=testing.subprocess_env())
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT')]
    out = json.loads(line[0][len('RESULT '):])
    self.assertEqual(out['got'], out['want'])
    seen = sum(out['ids'], []) + out['want']
    self.assertLen(set(seen), 16)  # 4 batches of one epoch: no repeats.
