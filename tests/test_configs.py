"""Every config in `configs/` is wired: two training steps of each stage of a
shrunk copy run on CPU, and the real schedules add up.

The shrunk copy keeps each config's stages, architectures (BEiT teachers at
reduced width and depth), augmentation, mixup and precision; it swaps the
dataset for a tiny generated one, the images for 32x32, the batch for 4,
the teacher for randomly initialised weights, and the diffusion head for a
small one, and scales every stage to two steps.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import numpy as np
from PIL import Image

from gendd_jax.data import builders
from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import config_lib
from gendd_jax import pipeline
from gendd_jax import precision
from gendd_jax import train
from gendd_jax import settings
from gendd_jax import stages

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = os.path.join(_ROOT, 'configs')
_TMP = None
_CLASSES = 3
_TRAIN_PER_CLASS = 3  # 9 images: two steps of 4 per epoch.


def load_module(name):
  spec = importlib.util.spec_from_file_location(
      f'config_{name}', os.path.join(_CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_configs() -> list[tuple[str, str]]:
  """`(file stem, variant)` for every config file and declared variant."""
  out = []
  for fname in sorted(os.listdir(_CONFIGS)):
    if not fname.endswith('.py') or fname.startswith('_'):
      continue
    stem = fname[:-3]
    for variant in getattr(load_module(stem), 'VARIANTS', ('',)):
      out.append((stem, variant))
  return out


def get_config(stem, variant):
  module = load_module(stem)
  return module.get_config(variant) if variant else module.get_config()


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_configs_')
  src = os.path.join(_TMP.name, 'src')
  rng = np.random.default_rng(0)
  for split, n in (('train', _TRAIN_PER_CLASS), ('val', 2)):
    for c in range(_CLASSES):
      folder = os.path.join(src, split, f'class{c}')
      os.makedirs(folder)
      for i in range(n):
        img = rng.integers(0, 255, (36, 36, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format='PNG')
        with open(os.path.join(folder, f'{i}.png'), 'wb') as f:
          f.write(buf.getvalue())
  builders.build('folder', src, os.path.join(_TMP.name, 'tfds'), 'mock',
                 log=lambda *a, **k: None)


def tearDownModule():
  random_teacher.cache_clear()
  _TMP.cleanup()


_BEIT_TINY = dict(embed_dim=32, depth=1, num_heads=2)


def shrink(config):
  """The shrunk copy described in the module docstring."""
  c = copy.deepcopy(config)
  with c.unlocked():
    in_memory = c.data.name in ('digits', 'digits32')
    if not in_memory:
      old = c.data
      c.data = config_lib.image_data(
          'folder:mock', image_size=32, augment=old.augment, batch_size=4,
          eval_batch_size=3, mixup=old.get('mixup', 0.0),
          cutmix=old.get('cutmix', 0.0),
          label_smoothing=old.get('label_smoothing', 0.0),
          eval_split='val')
      c.data.data_dir = os.path.join(_TMP.name, 'tfds')
      c.data.num_threads = 1
      c.data.prefetch = 4
      c.data.stats_batches = 1
    else:  # 2 folds of the digits: 7 steps of 128 per epoch.
      c.data.num_folds = 2
      c.data.batch_size = 128
      c.pipeline.seeds = (0,)
    for role in (c.teacher, c.student):
      if role.model.startswith('beit'):
        role.update(_BEIT_TINY)
    c.gendd.token_dim = 16
    c.gendd.width = 32
    c.gendd.depth = 1
    c.gendd.diffusion_batch_mul = 2
    c.sampler.steps = '2'
    c.sampler.num_sampling = 1
    c.log_every_steps = 1
    c.checkpoint_every_steps = 0
    spe = 0 if in_memory else _CLASSES * _TRAIN_PER_CLASS // 4
    for s in c.stages.values():
      scale = 1.0 / s.epochs
      if spe:  # Two steps per stage.
        s.epochs = 2.0 / spe
      else:    # Digits, 2 folds: 7 steps per epoch.
        s.epochs = 2.0 / 7
      scale *= s.epochs
      s.warmup_epochs *= scale
      s.decay_epochs = tuple(e * scale for e in s.decay_epochs)
  return c


@functools.lru_cache(maxsize=None)
def random_teacher(model: str, settings: tuple, num_classes: int,
                   input_shape: tuple) -> str:
  """An export of a randomly initialised teacher; returns its directory."""
  block = config_lib.teacher_block(model, **dict(settings))
  info = dict(num_classes=num_classes, input_shape=input_shape)
  net = stages.create_backbone(block, info, 0)
  _, params, bs = nnx.split(net, nnx.Param, nnx.BatchStat)
  out = os.path.join(_TMP.name, 'teachers', f'{model}_{num_classes}')
  ckpt_lib.save_export(out, dict(params=params, batch_stats=bs),
                       dict(stage='teacher', model=model,
                            num_classes=num_classes))
  return out


class CoverageTest(absltest.TestCase):

  def test_every_config_file_is_covered(self):
    trained = [k for k in globals() if k.startswith('TwoSteps_')]
    built = len(config_lib.CIFAR_PAIRS) - len(_TRAINED_CIFAR_PAIRS)
    self.assertLen(trained, len(all_configs()) - built)
    stems = {s for s, _ in all_configs()}
    for must in ('r50_600ep', 'r18_from_r34', 'mbv1_from_r50',
                 'r50_from_beitv2b', 'r50_from_beitv2l', 'cc3m_unsup',
                 'imagenet_lt', 'cifar100_gendd', 'cifar100_teacher',
                 'digits'):
      self.assertIn(must, stems)
    self.assertLen([v for s, v in all_configs() if s == 'cifar100_gendd'],
                   10)



class _TwoSteps(absltest.TestCase):
  """Two steps of each stage of one config variant."""

  def run_config(self, stem, variant):
    config = get_config(stem, variant)
    c = shrink(config)
    if c.stage == 'pipeline' and c.pipeline.protocol == 'kfold':
      c.pipeline.stages = ('teacher', 'gendd')
    names = (tuple(c.pipeline.stages) if c.stage == 'pipeline'
             else (c.stage,))
    if any(stages.get(s).needs_teacher for s in names) and \
        'teacher' not in names:
      teacher_args = tuple(sorted(
          (k, v) for k, v in c.teacher.items()
          if k not in ('model', 'checkpoint', 'source', 'features',
                       'init_from')))
      c.teacher.checkpoint = random_teacher(c.teacher.model, teacher_args,
                                            _CLASSES, (32, 32, 3))
    workdir = os.path.join(_TMP.name, 'runs', f'{stem}_{variant}')
    if c.stage == 'pipeline':
      out = pipeline.run(c, workdir)
      if c.pipeline.protocol == 'sequence':
        self.assertEqual(tuple(out['stages']), names)
        for stage in names:
          self.assertEqual(out['stages'][stage]['steps'], 2)
      else:
        self.assertIn('gendd', out['methods'])
    else:
      res = train.train_and_evaluate(c, workdir, quiet=True)
      self.assertEqual(res['steps'], 2)
    # The configured precision reached the models.
    for role in ('student', 'teacher', 'head'):
      precision.compute_dtype(config.precision[role])


def _two_steps_class(stem, variant):
  def test_two_steps_of_every_stage(self):
    self.run_config(stem, variant)

  name = f'TwoSteps_{stem}' + (f'_{variant}' if variant else '')
  return name.replace('-', '_'), type(name, (_TwoSteps,), {
      'test_two_steps_of_every_stage': test_two_steps_of_every_stage})


# CIFAR-100 pairs whose two steps run; the other pairs differ only in their
# networks and `smooth`, and are built and traced abstractly (`BuildsTest`).
# Every CIFAR network's forward is checked against torch in
# tests/test_zoo_cifar.py.
_TRAINED_CIFAR_PAIRS = ('resnet32x4-resnet8x4', 'resnet32x4-shufflev1',
                        'vgg13-mobilenetv2')


def _trained(stem, variant) -> bool:
  return stem != 'cifar100_gendd' or variant in _TRAINED_CIFAR_PAIRS


# One class per (config, variant): parallel workers take whole classes.
for _stem, _variant in all_configs():
  if _trained(_stem, _variant):
    _name, _cls = _two_steps_class(_stem, _variant)
    globals()[_name] = _cls
del _cls  # Only the named copies are test classes.


class BuildsTest(parameterized.TestCase):
  """The CIFAR-100 pairs not trained above: their config, models and
  feature widths, traced without computing anything."""

  @parameterized.parameters(
      *[p for p in config_lib.CIFAR_PAIRS if p not in _TRAINED_CIFAR_PAIRS])
  def test_pair_builds(self, pair):
    c = shrink(get_config('cifar100_gendd', pair))
    teacher, student = pair.split('-')
    self.assertEqual((c.teacher.model, c.student.model), (teacher, student))
    self.assertEqual(c.gendd.smooth, config_lib.CIFAR_PAIRS[pair])
    info = dict(num_classes=100, input_shape=(32, 32, 3))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), 'float32')
    feat_t = jax.eval_shape(
        lambda x: stages.create_backbone(c.teacher, info, 0)(x)[0], x)
    self.assertEqual(feat_t.shape,
                     (2, stages.teacher_feature_dim(c, info)))
    for stage in c.pipeline.stages:
      def forward(x, stage=stage):
        model = stages.get(stage).create_model(c, info)
        return (model.student(x) if stage == 'gendd' else model.backbone(x))[0]
      feat_s = jax.eval_shape(forward, x)
      self.assertEqual(feat_s.shape[0], 2)


class ScheduleMathTest(parameterized.TestCase):
  """Steps, warm-up and batch split of the real configs on their real
  datasets and a reference device count."""

  @parameterized.named_parameters(
      # name, config, variant, train examples, devices, accumulation,
      # expected (steps/epoch, stage-2 steps, warm-up steps, per device).
      ('r50_600ep_v4_32', 'r50_600ep', '', 'imagenet2012', 16, 1,
       (2502, 1_501_200, 25_020, 32)),
      ('r50_600ep_v4_8_accum4', 'r50_600ep', '', 'imagenet2012', 4, 4,
       (2502, 1_501_200, 25_020, 32)),
      ('r18_from_r34_8gpu', 'r18_from_r34', '', 'imagenet2012', 8, 1,
       (2502, 250_200, 25_020, 64)),
      ('mbv1_warmup20', 'mbv1_from_r50', '', 'imagenet2012', 8, 1,
       (2502, 250_200, 50_040, 64)),
      ('imagenet_lt_batch256', 'imagenet_lt', 'r50', 'imagenet_lt', 8, 1,
       (452, 45_200, 4_520, 32)),
      ('cc3m', 'cc3m_unsup', 'r18', 'cc3m', 8, 1,
       (5628, 562_800, 56_280, 64)),
      ('cifar_pair_1gpu', 'cifar100_gendd', 'resnet32x4-resnet8x4',
       'cifar100', 1, 1, (781, 187_440, 39_050, 64)),
  )
  def test_schedule(self, stem, variant, dataset, devices, accum, expected):
    c = get_config(stem, variant)
    c.grad_accum_steps = accum
    n = config_lib.TRAIN_EXAMPLES[dataset]
    spe = n // c.data.batch_size  # Whole batches per epoch.
    stage2 = [s for s in c.pipeline.stages if s != 'stage1'][0]
    ospec = settings.optim_spec(c, stage2, spe)
    per_device = c.data.batch_size // devices // accum
    self.assertEqual((spe, ospec.total_steps, ospec.warmup_steps,
                      per_device), expected)
    # Effective batch per optimizer update is the configured global batch.
    self.assertEqual(per_device * devices * accum, c.data.batch_size)
    if 'stage1' in c.pipeline.stages:
      s1 = settings.optim_spec(c, 'stage1', spe)
      self.assertEqual(s1.total_steps, int(c.stages.stage1.epochs) * spe)
      self.assertEqual(s1.lr, c.stages.stage1.lr)

  def test_paper_hyperparameters(self):
    c = get_config('r50_600ep', '')
    self.assertEqual(tuple(c.pipeline.stages), ('stage1', 'gendd'))
    g, s = c.gendd, c.stages.gendd
    self.assertEqual((s.epochs, s.lr, s.weight_decay), (600, 2e-3, 1e-2))
    self.assertEqual((c.data.mixup, c.data.cutmix, c.data.label_smoothing,
                      c.data.augment), (0.2, 1.0, 0.1, 'rand'))
    self.assertEqual((g.smooth, g.beta), (0.9, 0.0))
    self.assertEqual((c.stages.stage1.epochs, c.stages.stage1.lr), (20, 2e-3))
    self.assertEqual(c.precision.head, 'bfloat16')
    cifar = get_config('cifar100_gendd', 'resnet56-resnet20')
    self.assertEqual((cifar.gendd.smooth, cifar.gendd.diffusion_batch_mul,
                      cifar.sampler.steps, cifar.stages.gendd.warmup_epochs,
                      cifar.stages.stage1.epochs, cifar.stages.stage1.lr),
                     (0.9, 30, '100', 50, 50, 3e-3))
    unsup = get_config('cc3m_unsup', 'mbv1')
    self.assertEqual(tuple(unsup.pipeline.stages), ('gendd_unsup',))
    self.assertEqual(get_config('cc3m_unsup', 'mbv1_kl').pipeline.stages,
                     ('kl',))

  def test_unknown_variant(self):
    with self.assertRaisesRegex(ValueError, 'unknown CIFAR-100 pair'):
      get_config('cifar100_gendd', 'resnet8-resnet8')
    with self.assertRaisesRegex(ValueError, 'unknown variant'):
      get_config('cc3m_unsup', 'r50')


if __name__ == '__main__':
  absltest.main()
