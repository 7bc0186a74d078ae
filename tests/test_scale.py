"""Scale-out settings: gradient accumulation, mixed precision, the mesh
description and the start-up summary."""

from __future__ import annotations

import os
import subprocess
import sys

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import precision
from gendd_jax import sharding
from gendd_jax import train
from gendd_jax import errors
from gendd_jax import settings
from gendd_jax import reporting
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setUpModule():
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return dict(image=rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
              label=rng.integers(0, 10, n).astype(np.int32))


def _one_step(config, stage, batch, teacher=None):
  """`(new state, metrics)` after one train step from the initial state."""
  info = dict(num_classes=10, input_shape=(8, 8, 1))
  mesh = sharding.create_mesh(1)
  module = stages.get(stage).create_model(config, info)
  s = settings.step_settings(config, stage, 7)
  step, _ = train.jitted_steps(s, mesh)
  state = train.create_train_state(module, s.optim, mesh)
  return step(state, teacher or teacher_lib.Teacher(),
              sharding.shard_batch(batch, mesh))


class AccumulationTest(absltest.TestCase):

  def test_two_micro_batches_equal_one_batch(self):
    """Without BatchNorm or sampled noise the mean of the micro-batch
    gradients is the batch gradient: the update is the same."""
    batch = _batch()
    results = {}
    for accum in (1, 2, 4):
      c = testing.small_config('teacher')
      c.grad_accum_steps = accum
      state, metrics = _one_step(c, 'teacher', batch)
      results[accum] = (jax.device_get(state.params),
                        float(metrics['loss']))
    for accum in (2, 4):
      self.assertAlmostEqual(results[accum][1], results[1][1], places=5)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=2e-5, atol=2e-6), results[accum][0], results[1][0])

  def test_batch_must_split_over_devices_and_micro_batches(self):
    c = testing.small_config('teacher')
    c.grad_accum_steps = 3  # 128 is not divisible by 3.
    with self.assertRaisesRegex(errors.ConfigError, 'grad_accum_steps 3'):
      settings.create_mesh(c)
    c.grad_accum_steps = 0
    with self.assertRaisesRegex(errors.ConfigError, 'positive integer'):
      settings.create_mesh(c)


class PrecisionTest(absltest.TestCase):

  def test_bfloat16_compute_float32_state(self):
    export, _ = testing.teacher_export()
    c = testing.gendd_config()
    info = dict(num_classes=10, input_shape=(8, 8, 1))
    mesh = sharding.create_mesh(1)
    batch = _batch(seed=1)
    losses = {}
    for name in ('float32', 'bfloat16'):
      for role in ('student', 'head', 'teacher'):
        c.precision[role] = name
      teacher = teacher_lib.load(c, info, mesh)
      model = stages.get('gendd').create_model(c, info)
      dots = [n.dtype for _, n in nnx.iter_graph(model)
              if isinstance(n, nnx.Linear)]
      self.assertTrue(all(d == (None if name == 'float32' else jnp.bfloat16)
                          for d in dots), dots)
      state, metrics = _one_step(c, 'gendd', batch, teacher)
      for leaf in jax.tree.leaves(state.params):
        self.assertEqual(leaf.dtype, jnp.float32)
      for leaf in jax.tree.leaves(state.opt_state):
        if hasattr(leaf, 'dtype') and leaf.ndim:
          self.assertEqual(leaf.dtype, jnp.float32)
      losses[name] = float(metrics['loss'])
    self.assertTrue(np.isfinite(losses['bfloat16']))
    # Same weights, data and noise: bfloat16 rounding changes the loss by
    # well under a percent.
    self.assertAlmostEqual(losses['bfloat16'], losses['float32'],
                           delta=0.02 * abs(losses['float32']))
    self.assertNotEqual(losses['bfloat16'], losses['float32'])
    self.assertTrue(export)

  def test_unknown_dtype(self):
    c = testing.small_config('teacher')
    c.precision.head = 'float8'
    with self.assertRaisesRegex(errors.ConfigError,
                                "precision.head: unknown compute dtype"):
      precision.compute_dtypes(c)

  def test_to_float32_leaves_integers(self):
    out = precision.to_float32((jnp.ones(2, jnp.bfloat16),
                                jnp.ones(2, jnp.int32), None))
    self.assertEqual(out[0].dtype, jnp.float32)
    self.assertEqual(out[1].dtype, jnp.int32)


class MeshTest(absltest.TestCase):

  def test_mesh_description(self):
    mesh = sharding.mesh_from_config({'data': -1})
    self.assertEqual(mesh.axis_names, ('data',))
    self.assertIn('data=1 (1 cpu device(s)', sharding.describe(mesh))
    with self.assertRaisesRegex(ValueError, r"mesh axes \['model'\] are not "
                                'implemented'):
      sharding.mesh_from_config({'data': -1, 'model': 2})
    with self.assertRaisesRegex(ValueError, 'only 1 are visible'):
      sharding.mesh_from_config({'data': 4})

  def test_startup_summary(self):
    c = testing.gendd_config()
    c.grad_accum_steps = 2
    info = dict(num_classes=10, input_shape=(8, 8, 1))
    mesh = sharding.create_mesh(1)
    module = stages.get('gendd').create_model(c, info)
    teacher = teacher_lib.load(c, info, mesh)
    text = reporting.startup_summary(c, 'gendd', mesh, module,
                                     teacher.variables, info, 7,
                                     settings.optim_spec(c, 'gendd', 7))
    self.assertIn('global batch 128 = 1 device(s) x 64 per device x 2 '
                  'accumulation step(s); 7 steps/epoch x 2 epochs = 14 steps',
                  text)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    self.assertIn(f'trainable parameters {n / 1e6:.2f}M', text)
    self.assertIn('memory per device', text)
    self.assertIn('head float32', text)


_SHARDED_ACCUM = r'''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, numpy as np
import test_scale, testing
# `_one_step` builds a 1-device mesh; make it span the 8 devices.
_mesh = test_scale.sharding.create_mesh
test_scale.sharding.create_mesh = lambda n=None: _mesh(None)
testing.set_up_module()
c = testing.small_config('teacher')
out = {{}}
for accum in (1, 2):
  c.grad_accum_steps = accum
  state, m = test_scale._one_step(c, 'teacher', test_scale._batch(32))
  out[accum] = jax.device_get(state.params)
flat1 = jax.tree.leaves(out[1]); flat2 = jax.tree.leaves(out[2])
assert len(state.params['fc']['kernel'][...].sharding.device_set) == 8
print(max(float(np.max(np.abs(a - b))) for a, b in zip(flat1, flat2)))
'''


class ShardedAccumulationTest(absltest.TestCase):

  def test_eight_devices_two_micro_batches(self):
    script = _SHARDED_ACCUM.format(root=_ROOT, tests=os.path.dirname(__file__))
    env = testing.subprocess_env(devices=8)
    proc = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertLess(float(proc.stdout.strip().splitlines()[-1]), 2e-5)


if __name__ == '__main__':
  absltest.main()
