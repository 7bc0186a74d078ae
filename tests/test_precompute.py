"""Precomputed teacher features: written records, identical targets to the
on-the-fly teacher for the deterministic view, recorded augmented views, and
training that skips the teacher forward."""

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import data as data_lib
from gendd_jax import sharding
from gendd_jax import train
from gendd_jax import errors
from gendd_jax import settings
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
from gendd_jax.cli import precompute
from gendd_jax.data import augment
from gendd_jax.data import features as features_lib
import testing

_TMP = None


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_precompute_')
  testing.set_up_module()


def tearDownModule():
  features.cache_clear()
  testing.tear_down_module()
  _TMP.cleanup()


def _config(stage='gendd'):
  return testing.gendd_config(stage)


@functools.lru_cache(maxsize=None)
def features(dtype):
  c = _config()
  c.precompute.dtype = dtype
  out = os.path.join(_TMP.name, f'features_{dtype}')
  meta = precompute.run(c, out, quiet=True)
  return out, meta


def _teacher(config):
  info = dict(num_classes=10, input_shape=(64,))
  t = teacher_lib.load(config, info, sharding.create_mesh(1))
  return t.graphdef, t.variables


class PrecomputeTest(absltest.TestCase):

  def test_deterministic_view_equals_on_the_fly_teacher(self):
    out, meta = features('float32')
    c = _config()
    records, stored = features_lib.open_features(out)
    self.assertEqual(stored['records'], meta['records'])
    source = features_lib.image_source(c)
    self.assertEqual(len(records), len(source.ids))
    self.assertEqual(meta['views'], 0)
    graphdef, variables = _teacher(c)
    model = nnx.merge(graphdef, variables['params'], variables['batch_stats'])
    fwd = jax.jit(lambda x: model(x)[0])
    batch = int(c.data.eval_batch_size)
    got = np.stack([records[i]['feature'] for i in range(len(records))])
    ids = np.array([records[i]['id'] for i in range(len(records))])
    labels = np.array([records[i]['label'] for i in range(len(records))])
    np.testing.assert_array_equal(ids, source.ids)
    np.testing.assert_array_equal(
        labels, [source.example(int(i), 0, 0)[1] for i in source.ids])
    want = np.concatenate([
        np.asarray(fwd(jnp.asarray(np.stack(
            [source.example(int(i), 0, 0)[0]
             for i in source.ids[s:s + batch]]))))
        for s in range(0, len(source.ids), batch)])
    np.testing.assert_array_equal(got, want)  # Identical, float32.

  def test_float16_storage(self):
    out32, _ = features('float32')
    out16, _ = features('float16')
    r32, _ = features_lib.open_features(out32)
    r16, _ = features_lib.open_features(out16)
    self.assertEqual(r16[3]['feature'].dtype, np.float16)
    np.testing.assert_array_equal(
        r16[3]['feature'], r32[3]['feature'].astype(np.float16))

  def test_training_loss_equals_on_the_fly(self):
    c = _config()
    out, _ = features('float32')
    c.teacher.source = 'precomputed'
    c.teacher.features = out
    stream, _ = features_lib.train_stream(c)
    batch = next(stream)
    self.assertIn('teacher_feature', batch)
    info = dict(num_classes=10, input_shape=(64,))
    graphdef_t, variables = _teacher(c)
    module = stages.get('gendd').create_model(c, info)
    graphdef, params, bs = nnx.split(module, nnx.Param, nnx.BatchStat)
    s = settings.step_settings(c, 'gendd', 7)
    key = jax.random.key(0)
    stripped = stages.get('gendd').visible(batch)
    teacher = teacher_lib.Teacher(variables=variables, graphdef=graphdef_t)
    loss_fly, _ = train._loss_fn(s, graphdef, params, bs, teacher,
                                 {k: v for k, v in stripped.items()
                                  if k != 'teacher_feature'}, key)
    loss_pre, _ = train._loss_fn(
        s, graphdef, params, bs, teacher.replace(precomputed=True), stripped,
        key)
    self.assertEqual(float(loss_fly), float(loss_pre))

  def test_training_from_precomputed_runs_and_resumes(self):
    out, _ = features('float32')
    c = _config()
    c.teacher.source = 'precomputed'
    c.teacher.features = out
    workdir = os.path.join(_TMP.name, 'run_pre')
    res = train.train_and_evaluate(c, workdir, quiet=True)
    self.assertEqual(res['steps'], 14)
    self.assertIn('sampled_acc', res['accuracy'])
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual(json.load(f)['steps'], 14)

  def test_mixing_refused_label_smoothing_kept(self):
    out, _ = features('float32')
    c = _config()
    c.teacher.source = 'precomputed'
    c.teacher.features = out
    c.data.mixup = 0.8
    workdir = os.path.join(_TMP.name, 'mixed')
    with self.assertRaisesRegex(errors.ConfigError,
                                r'data.mixup mix the training images.*'
                                r'--config.data.mixup=0'):
      train.train_and_evaluate(c, workdir, quiet=True)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'results.json')))
    c.data.mixup = 0.0
    c.data.label_smoothing = 0.1
    batch = next(features_lib.train_stream(c)[0])
    labels = np.asarray(batch['label'])
    self.assertEqual(labels.shape, (c.data.batch_size, 10))
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(labels.max(-1), 0.9 + 0.1 / 10, rtol=1e-6)
    self.assertIn('teacher_feature', batch)

  def test_errors(self):
    c = _config()
    c.precompute.views = 2  # digits has no training augmentation.
    with self.assertRaisesRegex(precompute.PrecomputeError,
                                'needs a training augmentation'):
      precompute.run(c, os.path.join(_TMP.name, 'views'), quiet=True)
    out, _ = features('float32')
    with self.assertRaisesRegex(precompute.PrecomputeError,
                                'already holds precomputed features'):
      precompute.run(_config(), out, quiet=True)
    c = _config()
    c.teacher.source = 'precomputed'
    with self.assertRaisesRegex(errors.ConfigError, 'teacher.features'):
      train.train_and_evaluate(c, os.path.join(_TMP.name, 'nofeat'),
                               quiet=True)
    c.teacher.features = os.path.join(_TMP.name, 'nowhere')
    with self.assertRaisesRegex(data_lib.DataError, 'no precomputed'):
      train.train_and_evaluate(c, os.path.join(_TMP.name, 'nofeat2'),
                               quiet=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class DistributedPrecomputeTest(absltest.TestCase):

  def test_two_processes_of_four_devices_equal_one_device(self):
    # The command over 8 devices in 2 processes (each computing and writing
    # its range of the records, in its own shard files) stores the same
    # records in the same order as over one device; the last batch of each
    # process is padded.
    flags = ['gendd_jax.cli.precompute', '--config=configs/digits.py:quick',
             '--config.stage=gendd', '--config.data.eval_batch_size=64',
             '--config.precompute.logits=True',
             '--config.precompute.shard_size=500',
             f'--config.teacher.checkpoint={testing.teacher_export()[0]}']
    one = os.path.join(_TMP.name, 'pre_one')
    p = subprocess.run([sys.executable, '-m', *flags, f'--workdir={one}'],
                       cwd=testing.ROOT, env=testing.subprocess_env(1),
                       capture_output=True, text=True, timeout=600)
    self.assertEqual(p.returncode, 0, p.stderr[-2000:])
    two = os.path.join(_TMP.name, 'pre_two')
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, '-m', *flags, f'--workdir={two}', '--distributed',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={i}'], cwd=testing.ROOT,
        env=testing.subprocess_env(4), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
      self.assertEqual(proc.returncode, 0, err[-2000:])
    self.assertIn('8 device(s)', outs[0][0])
    a, meta_a = features_lib.open_features(one)
    b, meta_b = features_lib.open_features(two)
    self.assertEqual((meta_a['processes'], meta_b['processes']), (1, 2))
    self.assertEqual(len(a), len(b))
    self.assertEqual(len(a), meta_a['examples'])
    self.assertNotEqual(len(a) // 2 % 32, 0)  # A padded last batch.
    files = sorted(os.listdir(os.path.join(
        two, features_lib.FEATURES_NAME, '1.0.0')))
    shards = precompute._shard_lengths(  # pylint: disable=protected-access
        precompute._ranges(len(a), 2), 500)  # pylint: disable=protected-access
    self.assertLen([f for f in files if '.array_record-' in f],
                   len(shards[0]) + len(shards[1]))
    for i in range(len(a)):
      ra, rb = a[i], b[i]
      for k in ('id', 'view', 'label'):
        self.assertEqual(int(ra[k]), int(rb[k]), f'record {i} {k}')
      np.testing.assert_allclose(ra['feature'], rb['feature'], atol=1e-5,
                                 err_msg=f'record {i}')
      np.testing.assert_allclose(ra['logits'], rb['logits'], atol=1e-5,
                                 err_msg=f'record {i}')


class AugmentedViewsTest(absltest.TestCase):

  def test_views_are_recorded_and_reproducible(self):
    split = data_lib.ArraySplit(
        np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(
            np.float32), np.arange(6, dtype=np.int32),
        np.ones(6, bool), np.arange(6) * 10)
    pos = {int(i): p for p, i in enumerate(split.index)}

    def view(i, k, seed):
      img = split.images[pos[i]]
      if k == 0:
        return img
      return augment.pad_crop_flip(
          img[None], features_lib.view_rng(seed, i, k))[0]

    def example(i, k, seed):
      return view(i, k, seed), int(split.labels[pos[i]]), True

    src = features_lib.ImageSource(ids=split.index, example=example,
                                   has_augmentation=True,
                                   info=dict(num_classes=3,
                                             input_shape=(8, 8, 3)))
    out = os.path.join(_TMP.name, 'views')
    calls = []

    def teacher_fn(images):
      calls.append(images.copy())
      return images.reshape(len(images), -1), np.zeros((len(images), 3))
    meta = precompute.write_features(
        out, teacher_fn, src, views=2, aug_seed=7, batch=4,
        dtype='float32', with_logits=True, shard_size=5, num_classes=3,
        quiet=True)
    self.assertEqual(meta['records'], 18)
    records, stored = features_lib.open_features(out)
    self.assertEqual((stored['aug_seed'], stored['views']), (7, 2))
    self.assertLen(records, 18)
    for r in (records[i] for i in range(18)):
      again = view(int(r['id']), int(r['view']), 7)
      np.testing.assert_array_equal(r['feature'], again.reshape(-1))
      self.assertEqual(r['logits'].shape, (3,))
    # Views 1 and 2 differ from view 0 and from each other.
    by = {(int(r['id']), int(r['view'])): r['feature']
          for r in (records[i] for i in range(18))}
    self.assertFalse(np.array_equal(by[(10, 1)], by[(10, 2)]))


if __name__ == '__main__':
  absltest.main()
