"""grain pipelines: per-process sharding, determinism, resumable state
(through a checkpoint), skipped records and exact-once evaluation."""

import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax.data import streams as ip

_N = 48


def _source(n=_N):
  return [dict(image=np.full((2, 2, 1), i, np.float32), label=np.int64(i % 5))
          for i in range(n)]


def _fn(record, rng):
  if int(record['image'][0, 0, 0]) in _FN_SKIP:
    return None
  return dict(image=record['image'] + rng.uniform(0, 1e-3),
              id=np.int64(record['_index']), label=np.int32(record['label']))


_FN_SKIP = set()


def _read(settings=ip.ReadSettings(num_threads=2, prefetch=8)):
  return settings


class TrainStreamTest(parameterized.TestCase):

  def tearDown(self):
    super().tearDown()
    _FN_SKIP.clear()

  @parameterized.parameters(1, 2, 4)
  def test_every_example_once_per_epoch_over_processes(self, count):
    seen = []
    for p in range(count):
      s = ip.TrainStream(_source(), 8, seed=3, example_fn=_fn,
                         process_index=p, process_count=count, read=_read())
      self.assertEqual(s.steps_per_epoch, _N // 8)
      for _ in range(s.steps_per_epoch):
        b = next(s)
        self.assertEqual(b['image'].shape, (8 // count, 2, 2, 1))
        seen.extend(b['id'].tolist())
    self.assertEqual(sorted(seen), list(range(_N)))

  def test_deterministic_given_seed_and_reshuffled_each_epoch(self):
    def ids(seed, steps=12):
      s = ip.TrainStream(_source(), 8, seed=seed, example_fn=_fn,
                         read=_read())
      return [next(s)['id'].tolist() for _ in range(steps)]
    a, b, c = ids(0), ids(0), ids(1)
    self.assertEqual(a, b)
    self.assertNotEqual(a, c)
    self.assertNotEqual(a[:6], a[6:])  # Epoch 2 is another permutation.
    self.assertEqual(sorted(sum(a[6:], [])), list(range(_N)))

  def test_state_round_trips_through_a_checkpoint(self):
    s = ip.TrainStream(_source(), 8, seed=5, example_fn=_fn, read=_read())
    for _ in range(7):
      next(s)
    state = s.get_state()
    expected = [next(s) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = ckpt_lib.Checkpointer(tmp, async_save=True)
      ckpt.save(7, {'x': jnp.ones(2)}, {'stage': 't'}, data_state=state)
      ckpt.close()
      ckpt = ckpt_lib.Checkpointer(tmp)
      _, meta = ckpt.restore({'x': jnp.zeros(2)})
      ckpt.close()
    self.assertEqual(meta['stage'], 't')
    fresh = ip.TrainStream(_source(), 8, seed=5, example_fn=_fn,
                           read=_read())
    fresh.set_state(meta['data_state'])
    for want in expected:
      got = next(fresh)
      np.testing.assert_array_equal(got['id'], want['id'])
      np.testing.assert_array_equal(got['image'], want['image'])

  def test_rejected_records_are_skipped(self):
    _FN_SKIP.update({3, 10, 11})
    s = ip.TrainStream(_source(), 5, seed=0, example_fn=_fn, read=_read())
    ids = np.concatenate([next(s)['id'] for _ in range(9)])
    self.assertEqual(sorted(ids.tolist()),
                     sorted(set(range(_N)) - {3, 10, 11}))

  def test_batch_transform_and_errors(self):
    def double(batch, rng):
      del rng
      return dict(batch, image=batch['image'] * 2)
    s = ip.TrainStream(_source(), 4, seed=0, example_fn=_fn,
                       batch_fn=double, read=_read())
    b = next(s)
    np.testing.assert_allclose(b['image'][:, 0, 0, 0] / 2, b['id'],
                               atol=1e-3)
    with self.assertRaisesRegex(ip.PipelineError, 'divisible'):
      ip.TrainStream(_source(), 6, seed=0, example_fn=_fn, process_count=4)
    with self.assertRaisesRegex(ip.PipelineError, 'fewer than its batch'):
      ip.TrainStream(_source(6), 8, seed=0, example_fn=_fn)
    other = ip.TrainStream(_source(), 4, seed=0, example_fn=_fn,
                           read=_read())
    with self.assertRaisesRegex(ip.PipelineError, 'does not fit'):
      other.set_state({'bogus': 1})


class EvalBatchesTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_every_example_exactly_once(self, count):
    _FN_SKIP.add(7)
    try:
      ids, valid = [], 0
      for p in range(count):
        for b in ip.eval_batches(_source(45), 10, _fn, process_index=p,
                                 process_count=count):
          self.assertEqual(b['image'].shape[0], 10 // count)
          self.assertLen(b['valid_global'], 10)
          keep = b['valid'] > 0
          ids.extend(b['id'][keep].tolist())
          valid += int(b['valid_global'].sum()) if p == 0 else 0
      self.assertEqual(sorted(ids), sorted(set(range(45)) - {7}))
      self.assertEqual(valid, 44)
    finally:
      _FN_SKIP.clear()


if __name__ == '__main__':
  absltest.main()
