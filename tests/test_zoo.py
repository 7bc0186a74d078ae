"""The model registry, the params/FLOPs command, and every model family
jitted under an 8-device data-parallel mesh.

BatchNorm under data parallelism: the batch is one global array split along
the mesh's `data` axis, so a training-mode BatchNorm inside `jit` reduces
over the global batch (synchronised BatchNorm) and its running statistics
stay replicated. The sharded test checks exactly that against one device.
"""

import contextlib
import io
import os
import subprocess
import sys
import json
import tempfile

from absl.testing import absltest
from flax import nnx

from gendd_jax import models
from gendd_jax.cli import common
from gendd_jax.cli import zoo
import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One model per kind of layer (plain, grouped and depthwise convolutions,
# channel shuffle, attention), at a small input, with tiny-size settings.
FAMILIES = (
    ('resnext50_32x4d', 32, {}),
    ('mobilenet_v1', 32, {}),
    ('resnet8x4', 32, {}),
    ('shufflev1', 32, {}),
    ('beitv2_base_patch16_224', 32,
     dict(embed_dim=32, depth=2, num_heads=2)),
)

_SHARDED_SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, {root!r})
from gendd_jax import models, sharding

assert jax.device_count() == 8, jax.devices()
mesh = sharding.create_mesh()
families = json.loads({families!r})
out = {{}}
for name, size, kw in families:
  m = models.create_backbone(name, num_classes=10,
                             input_shape=(size, size, 3), rngs=nnx.Rngs(0),
                             **kw)
  graphdef, params, stats = nnx.split(m, nnx.Param, nnx.BatchStat)
  x = np.random.default_rng(0).normal(size=(16, size, size, 3)).astype(
      np.float32) * 2.0 + 0.5

  def fwd(params, stats, x, train):
    model = nnx.merge(graphdef, params, stats)
    feat, logits = model(x, train=train)
    return feat, logits, nnx.state(model, nnx.BatchStat)

  f = jax.jit(fwd, static_argnums=3)
  rep = sharding.replicated(mesh)
  xs = jax.device_put(x, sharding.data_sharded(mesh))
  ps, ss = jax.device_put((params, stats), rep)
  for train in (False, True):
    one = jax.device_get(f(params, stats, x, train))
    many = f(ps, ss, xs, train)
    assert many[1].sharding.spec == P('data'), many[1].sharding
    for leaf in jax.tree.leaves(many[2]):
      assert leaf.sharding.is_fully_replicated, (name, leaf.sharding)
    many = jax.device_get(many)
    gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
    scale = max(float(np.max(np.abs(np.asarray(a))))
                for a in jax.tree.leaves(one))
    out[f'{{name}}/{{"train" if train else "eval"}}'] = (gap, scale)
  # Training mode moved the running statistics (where the model has any).
  moved = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(stats), jax.tree.leaves(many[2]))]
  out[f'{{name}}/stats_moved'] = (float(np.mean(moved)) if moved else -1.0,
                                  0.0)
print('RESULT', json.dumps(out))
'''


class RegistryTest(absltest.TestCase):

  def test_every_family_is_registered(self):
    for name, _, _ in FAMILIES:
      self.assertIn(name, models.REGISTRY)

  def test_unknown_model_lists_the_choices(self):
    with self.assertRaisesRegex(models.ModelError,
                                'unknown model .*available: .*resnet50'):
      models.create_backbone('resnet51', num_classes=10,
                             input_shape=(32, 32, 3), rngs=nnx.Rngs(0))


class ZooCommandTest(absltest.TestCase):

  def test_counts_match_published_figures(self):
    # torchvision's documented parameters and GFLOPS (multiply-adds).
    for name, params, gmacs in (('resnet18', 11_689_512, 1.81),
                                ('resnet50', 25_557_032, 4.09)):
      s = zoo.summarise(name)
      self.assertEqual(s['params'], params)
      self.assertAlmostEqual(s['gmacs'], gmacs, delta=0.01)
      self.assertGreater(s['xla_gflops'], 1.5 * s['gmacs'])

  def test_command_prints_a_table(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      code = common.call(zoo.main, ['resnet18', 'resnet8x4'])
    self.assertEqual(code, 0)
    lines = out.getvalue().splitlines()
    self.assertEqual(len(lines), 3)
    self.assertRegex(lines[1], r'^resnet18 +224 +1000 +512 +11,689,512 ')
    self.assertRegex(lines[2], r'^resnet8x4 +32 +100 +256 ')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      self.assertEqual(common.call(zoo.main, ['resnet51']), 2)
    self.assertIn("unknown model(s) ['resnet51']", err.getvalue())


class ShardedForwardTest(absltest.TestCase):

  def test_eight_devices_match_one(self):
    script = _SHARDED_SCRIPT.format(root=_ROOT,
                                    families=json.dumps(FAMILIES))
    env = testing.subprocess_env(devices=8)
    with tempfile.TemporaryDirectory() as tmp:
      proc = subprocess.run([sys.executable, '-c', script], env=env,
                            capture_output=True, text=True, timeout=600,
                            cwd=tmp)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    line = [ln for ln in proc.stdout.splitlines()
            if ln.startswith('RESULT')]
    results = json.loads(line[0][len('RESULT '):])
    for name, _, _ in FAMILIES:
      for mode in ('eval', 'train'):
        gap, scale = results[f'{name}/{mode}']
        self.assertGreater(scale, 0.0)
        self.assertLess(gap, 1e-4 * max(scale, 1.0), f'{name} {mode}')
      moved = results[f'{name}/stats_moved'][0]
      if name.startswith('beit'):
        self.assertEqual(moved, -1.0)  # No BatchNorm.
      else:
        self.assertGreater(moved, 0.9, name)


if __name__ == '__main__':
  absltest.main()
