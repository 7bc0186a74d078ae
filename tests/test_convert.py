"""Teacher import: the convert command, file formats and clear errors.

Logit parity with PyTorch per architecture lives in the `test_zoo_*` files;
these tests cover the command around it: reading `.safetensors` and torch
pickles (wrapped or not), writing an export the trainer loads as a teacher,
and one clear message for every kind of bad input.
"""

import contextlib
import io
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from flax import nnx
import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file
import torch

from gendd_jax.cli import common
from gendd_jax.cli import convert
from gendd_jax.models import torch_import
from gendd_jax import models
from gendd_jax import sharding
from gendd_jax import teacher as teacher_lib
from gendd_jax import errors

_SHAPE = (32, 32, 3)


def _model(name='resnet18', classes=10, seed=0):
  """A model with random weights and batch statistics, built without JAX
  random-number kernels (eager initialisation compiles one per shape)."""
  abstract = nnx.eval_shape(lambda: models.create_backbone(
      name, num_classes=classes, input_shape=_SHAPE, rngs=nnx.Rngs(0)))
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  rng = np.random.default_rng(seed)

  def weight(x):
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
    return (rng.normal(size=x.shape) / np.sqrt(fan_in)).astype(np.float32)

  params = jax.tree.map(weight, params)
  stats = jax.tree.map(
      lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), stats)
  return nnx.merge(graphdef, params, stats)


def _run(argv):
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    code = common.call(convert.main, argv)
  return code, out.getvalue(), err.getvalue()


class ConvertCommandTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self._tmp = tempfile.TemporaryDirectory()
    self.addCleanup(self._tmp.cleanup)
    self.tmp = self._tmp.name
    self.x = np.random.default_rng(0).normal(size=(2, *_SHAPE)).astype(
        np.float32)

  def _teacher_config(self, path, model='resnet18'):
    return ml_collections.ConfigDict(dict(
        stage='kd', teacher=dict(model=model, checkpoint=path)))

  def _check_export(self, out, source):
    info = dict(num_classes=10, input_shape=_SHAPE)
    t = teacher_lib.load(self._teacher_config(out), info,
                         sharding.create_mesh(1))
    loaded = nnx.merge(t.graphdef, t.variables['params'],
                       t.variables['batch_stats'])
    f0, l0 = source(self.x)
    f1, l1 = loaded(self.x)
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(f1))

  def test_safetensors_round_trip_loads_as_teacher(self):
    src = _model(seed=1)
    path = os.path.join(self.tmp, 'r18.safetensors')
    save_file(torch_import.export_state_dict(src), path)
    out = os.path.join(self.tmp, 'export')
    code, stdout, err = _run(['--arch', 'resnet18', '--checkpoint', path,
                              '--out', out, '--image_size', '32'])
    self.assertEqual(code, 0, err)
    self.assertIn('11,181,642 parameters, 10 classes', stdout)  # Inferred.
    self._check_export(out, src)

  def test_paths_under_home_are_expanded(self):
    # After `--flag=` the shell leaves `~` as it is; the command expands it,
    # and so does the teacher loader (`config.teacher.checkpoint`).
    src = _model(seed=3)
    save_file(torch_import.export_state_dict(src),
              os.path.join(self.tmp, 'r18.safetensors'))
    with mock.patch.dict(os.environ, {'HOME': self.tmp}):
      code, _, err = _run(['--arch=resnet18',
                           '--checkpoint=~/r18.safetensors',
                           '--out=~/export', '--image_size=32'])
      self.assertEqual(code, 0, err)
      self.assertTrue(os.path.isfile(os.path.join(self.tmp, 'export',
                                                  'meta.json')))
      self._check_export('~/export', src)

  def test_wrapped_torch_pickle_with_ddp_prefix(self):
    src = _model(seed=2)
    sd = {f'module.{k}': torch.from_numpy(v)
          for k, v in torch_import.export_state_dict(src).items()}
    sd['module.bn1.num_batches_tracked'] = torch.tensor(7)
    path = os.path.join(self.tmp, 'ckpt_epoch_240.pth')
    torch.save({'epoch': 240, 'model': sd, 'optimizer': {}}, path)
    out = os.path.join(self.tmp, 'export')
    code, _, err = _run(['--arch', 'resnet18', '--checkpoint', path,
                         '--out', out, '--image_size', '32'])
    self.assertEqual(code, 0, err)
    self._check_export(out, src)

  def test_teacher_model_mismatch_is_a_config_error(self):
    path = os.path.join(self.tmp, 'r18.safetensors')
    save_file(torch_import.export_state_dict(_model()), path)
    out = os.path.join(self.tmp, 'export')
    self.assertEqual(_run(['--arch', 'resnet18', '--checkpoint', path,
                           '--out', out, '--image_size', '32'])[0], 0)
    info = dict(num_classes=10, input_shape=_SHAPE)
    with self.assertRaisesRegex(errors.ConfigError,
                                "is a 'resnet18'.*'resnet34'"):
      teacher_lib.load(self._teacher_config(out, 'resnet34'), info,
                       sharding.create_mesh(1))

  def test_bad_inputs_give_one_clear_error(self):
    good = os.path.join(self.tmp, 'r18.safetensors')
    save_file(torch_import.export_state_dict(_model()), good)
    garbage = os.path.join(self.tmp, 'bad.safetensors')
    with open(garbage, 'wb') as f:
      f.write(b'\x00not a safetensors file')
    bad_pth = os.path.join(self.tmp, 'bad.pth')
    with open(bad_pth, 'wb') as f:
      f.write(b'truncated')
    no_sd = os.path.join(self.tmp, 'nosd.pth')
    torch.save({'epoch': 3, 'best_acc': 0.5}, no_sd)
    existing = os.path.join(self.tmp, 'existing')
    self.assertEqual(_run(['--arch', 'resnet18', '--checkpoint', good,
                           '--out', existing, '--image_size', '32'])[0], 0)
    before = sorted(os.listdir(existing))
    cases = [
        (['--arch', 'resnet18', '--checkpoint', 'nope.pth'],
         'does not exist'),
        (['--arch', 'resnet9000', '--checkpoint', good], 'unknown --arch'),
        (['--arch', 'resnet18', '--checkpoint', garbage], 'cannot read'),
        (['--arch', 'resnet18', '--checkpoint', bad_pth], 'cannot read'),
        (['--arch', 'resnet18', '--checkpoint', no_sd], 'no state dict'),
        (['--arch', 'resnet34', '--checkpoint', good],
         r"missing keys \['layer1.2"),
        (['--arch', 'resnet18', '--checkpoint', good, '--num_classes', '5'],
         r"shape mismatch for 'fc.bias': .*'fc.weight': checkpoint has "
         r'\(10, 512\), ResNet needs \(5, 512\)'),
        (['--arch', 'resnet18', '--checkpoint', good, '--out', existing],
         'already holds an export'),
    ]
    for argv, message in cases:
      if '--out' not in argv:
        argv = argv + ['--out', os.path.join(self.tmp, 'never')]
      code, _, err = _run(argv + ['--image_size', '32'])
      self.assertEqual(code, 2, argv)
      self.assertRegex(err, f'^error: .*{message}', argv)
      self.assertEqual(len(err.strip().splitlines()), 1, err)
    self.assertFalse(os.path.exists(os.path.join(self.tmp, 'never')))
    self.assertEqual(sorted(os.listdir(existing)), before)


class LoadStateDictTest(absltest.TestCase):

  def test_unexpected_key_is_named_and_model_untouched(self):
    m = _model()
    before = torch_import.export_state_dict(m)
    sd = dict(torch_import.export_state_dict(_model(seed=3)))
    sd['layer5.0.conv1.weight'] = np.zeros((1, 1, 1, 1), np.float32)
    with self.assertRaisesRegex(torch_import.ConversionError,
                                "unexpected keys \\['layer5.0.conv1.weight'"):
      torch_import.load_state_dict(m, sd)
    after = torch_import.export_state_dict(m)
    for k in before:
      np.testing.assert_array_equal(before[k], after[k])

  def test_shape_error_leaves_model_untouched(self):
    m = _model()
    before = torch_import.export_state_dict(m)
    sd = dict(torch_import.export_state_dict(_model(seed=3)))
    sd['layer4.1.bn2.running_var'] = np.ones(3, np.float32)
    with self.assertRaisesRegex(torch_import.ConversionError,
                                'layer4.1.bn2.running_var'):
      torch_import.load_state_dict(m, sd)
    after = torch_import.export_state_dict(m)
    for k in before:
      np.testing.assert_array_equal(before[k], after[k])

  def test_torch_key_layout(self):
    keys = torch_import.model_key_map(_model())
    self.assertIn('layer2.0.downsample.0.weight', keys)
    self.assertIn('layer2.0.downsample.1.running_var', keys)
    self.assertEqual(keys['fc.weight'], ('fc', 'kernel'))
    self.assertEqual(len(keys), 102)  # torchvision's 122 less 20 counters.


if __name__ == '__main__':
  absltest.main()
