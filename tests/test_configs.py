"""Every config in `configs/` is wired, in its `:tiny` form, and the real
schedules add up.

`config_lib.tiny` shrinks a config to two steps per stage on the in-memory
digits at 32x32 (batch 4, small diffusion head, BEiTs at reduced width and
depth, ImageNet ResNets and MobileNetV1 at one block per stage, the teacher
at its random initialisation where the config distils without a teacher
stage), keeping its stages, architectures and precision. Per config family one
member trains for real (`TwoSteps_*`; the ImageNet family's on a tiny
generated image folder through grain, with its configured RandAugment,
mixup, CutMix and label smoothing, and a random teacher export). Every
config and variant is traced abstractly (`TracedTest`: each stage's model
builds with matching widths, and every convolution and matmul of the traced
teacher and student forwards, and every head layer, is in the configured
compute dtype). The networks' forwards are checked against PyTorch in
tests/test_zoo_*.py, and every stage's loss and step in tests/test_train.py.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
from PIL import Image

from gendd_jax.data import builders
from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import config_lib
from gendd_jax import data as data_lib
from gendd_jax import optim
from gendd_jax import pipeline
from gendd_jax import precision
from gendd_jax import settings
from gendd_jax import stages as stages_lib
from gendd_jax import teacher as teacher_lib
from gendd_jax import train
import testing

_CONFIGS = testing.CONFIGS
_TMP = None
_CLASSES = 3
_TRAIN_PER_CLASS = 3  # 9 images: two steps of 4 per epoch.


def all_configs() -> list[tuple[str, str]]:
  """`(file stem, variant)` for every config file and declared variant."""
  out = []
  for fname in sorted(os.listdir(_CONFIGS)):
    if not fname.endswith('.py') or fname.startswith('_'):
      continue
    stem = fname[:-3]
    for variant in getattr(testing.config_module(stem), 'VARIANTS', ('',)):
      out.append((stem, variant))
  return out


def get_config(stem, variant, tiny=False):
  arg = ','.join(t for t in (variant, 'tiny' if tiny else '') if t)
  return testing.load_config(stem, arg or None)


# Family -> (config, variant) trained for two steps, whether it reads the
# grain path (a generated image folder with the configured augmentation),
# and the configs it stands for (the others are traced).
FAMILIES = {
    'digits': (('digits', 'quick'), False, ('digits',)),
    'cifar': (('cifar100_gendd', 'vgg13-vgg8'), False,
              ('cifar100_gendd', 'cifar100_teacher', 'digits32_cifar_style')),
    'imagenet': (('r50_600ep', ''), True,
                 ('r18_from_r34', 'mbv1_from_r50', 'r50_from_beitv2b',
                  'r50_from_beitv2l', 'r50_600ep', 'cc3m_unsup',
                  'imagenet_lt')),
}
_TRAINED = {v[0]: v[1] for v in FAMILIES.values()}


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_test_configs_')


def tearDownModule():
  random_teacher.cache_clear()
  mock_folder.cache_clear()
  _TMP.cleanup()


@functools.lru_cache(maxsize=None)
def mock_folder() -> str:
  """A 3-class image folder built as 'folder:mock'; returns its data_dir."""
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
  out = os.path.join(_TMP.name, 'tfds')
  builders.build('folder', src, out, 'mock', log=lambda *a, **k: None)
  return out


def on_grain(tiny, full):
  """`tiny` reading the mock folder through grain with `full`'s
  augmentation, mixup, CutMix and label smoothing; two steps per stage."""
  c = copy.deepcopy(tiny)
  with c.unlocked():
    old = full.data
    c.data = config_lib.image_data(
        'folder:mock', image_size=32, augment=old.augment, batch_size=4,
        eval_batch_size=3, mixup=old.get('mixup', 0.0),
        cutmix=old.get('cutmix', 0.0),
        label_smoothing=old.get('label_smoothing', 0.0), eval_split='val')
    c.data.data_dir = mock_folder()
    c.data.num_threads = 1
    c.data.prefetch = 4
    c.data.stats_batches = 1
    spe = _CLASSES * _TRAIN_PER_CLASS // 4
    for name, s in c.stages.items():
      scale = 2.0 / spe / s.epochs
      s.epochs *= scale
      s.warmup_epochs *= scale
      s.decay_epochs = tuple(e * scale for e in s.decay_epochs)
  return c


@functools.lru_cache(maxsize=None)
def random_teacher(model: str, settings: tuple, num_classes: int,
                   input_shape: tuple) -> str:
  """An export of a randomly initialised teacher; returns its directory."""
  block = config_lib.teacher_block(model, **dict(settings))
  info = dict(num_classes=num_classes, input_shape=input_shape)
  net = stages_lib.create_backbone(block, info, 0)
  _, params, bs = nnx.split(net, nnx.Param, nnx.BatchStat)
  out = os.path.join(_TMP.name, 'teachers', f'{model}_{num_classes}')
  ckpt_lib.save_export(out, dict(params=params, batch_stats=bs),
                       dict(stage='teacher', model=model,
                            num_classes=num_classes))
  return out


def _case_name(stem, variant):
  return (stem + (f'_{variant}' if variant else '')).replace('-', '_')


def stages_of(c) -> tuple[str, ...]:
  return tuple(c.pipeline.stages) if c.stage == 'pipeline' else (c.stage,)


class CoverageTest(absltest.TestCase):

  def test_every_config_file_is_covered(self):
    configs = all_configs()
    trained = sorted(k for k in globals() if k.startswith('TwoSteps_'))
    self.assertLen(trained, len(FAMILIES))
    # Every config and variant is traced; one per family also trains.
    self.assertEqual(sorted(TracedTest.CASES), sorted(configs))
    self.assertLessEqual(set(_TRAINED), set(configs))
    # Every config file belongs to exactly one family.
    stems = sorted({s for s, _ in configs})
    members = sorted(m for v in FAMILIES.values() for m in v[2])
    self.assertEqual(members, stems)
    for must in ('r50_600ep', 'r18_from_r34', 'mbv1_from_r50',
                 'r50_from_beitv2b', 'r50_from_beitv2l', 'cc3m_unsup',
                 'imagenet_lt', 'cifar100_gendd', 'cifar100_teacher',
                 'digits', 'digits32_cifar_style'):
      self.assertIn(must, stems)
    self.assertLen([v for s, v in configs if s == 'cifar100_gendd'], 12)

  def test_tiny_keeps_the_wiring(self):
    for stem, variant in all_configs():
      full = get_config(stem, variant)
      tiny = get_config(stem, variant, tiny=True)
      name = f'{stem}:{variant}'
      self.assertEqual(tiny.teacher.model, full.teacher.model, name)
      self.assertEqual(tiny.student.model, full.student.model, name)
      self.assertEqual(tiny.precision.to_dict(), full.precision.to_dict(),
                       name)
      self.assertEqual(tiny.stage, full.stage, name)
      full_stages = stages_of(full)
      self.assertEqual(stages_of(tiny)[-len(full_stages):], full_stages,
                       name)
      self.assertIn(tiny.data.name, ('digits', 'digits32'), name)
      self.assertEqual(tiny.data.batch_size, 4, name)
      self.assertEqual(tiny.gendd.smooth, full.gendd.smooth, name)
      for s in stages_of(tiny):
        if s in full.stages:
          self.assertEqual(
              (tiny.stages[s].optimizer, tiny.stages[s].schedule,
               tiny.stages[s].lr), (full.stages[s].optimizer,
                                    full.stages[s].schedule,
                                    full.stages[s].lr), name)

  def test_random_teacher_is_one_teacher(self):
    c = get_config('cifar100_gendd', 'resnet32x4-resnet8x4', tiny=True)
    self.assertEqual(c.teacher.source, 'random')
    self.assertEqual(get_config('digits', '', tiny=True).teacher.source,
                     'model')  # Its k-fold pipeline trains the teacher.
    c.stage = 'gendd'
    info = dict(num_classes=10, input_shape=(32, 32, 3))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
    a = teacher_lib.load(c, info, mesh)
    b = teacher_lib.load(c, info, mesh)  # E.g. training, then the export.
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
      np.testing.assert_array_equal(x, y)
    w, bias = a.classifier()
    self.assertEqual((w.shape[0], bias.shape[0]), (10, 10))
    self.assertGreater(float(jnp.abs(w).max()), 0.0)
    c.teacher.source = 'nope'
    with self.assertRaisesRegex(settings.ConfigError,
                                "expected 'model', 'precomputed' or "
                                "'random'"):
      settings.precomputed_teacher(c, 'gendd')

  def test_argument_grammar(self):
    a = config_lib.parse_arg('resnet56-resnet20,tiny', variant='x')
    self.assertEqual((a.variant, a.tiny), ('resnet56-resnet20', True))
    a = config_lib.parse_arg('resnet56-resnet20:tiny', variant='x')
    self.assertEqual((a.variant, a.tiny), ('resnet56-resnet20', True))
    a = config_lib.parse_arg('tiny=0,variant=y', variant='x')
    self.assertEqual((a.variant, a.tiny), ('y', False))
    self.assertEqual(config_lib.parse_arg(None, variant='x').variant, 'x')
    self.assertTrue(config_lib.parse_arg('tiny').tiny)
    with self.assertRaisesRegex(ValueError, 'no variant'):
      config_lib.parse_arg('big')
    with self.assertRaisesRegex(ValueError, 'unknown setting'):
      config_lib.parse_arg('size=3', variant='x')
    with self.assertRaisesRegex(ValueError, 'more than one bare word'):
      config_lib.parse_arg('a,b', variant='x')
    with self.assertRaisesRegex(ValueError, 'not a boolean'):
      config_lib.parse_arg('tiny=maybe', variant='x')
    with self.assertRaisesRegex(ValueError, 'unknown CIFAR-100 pair'):
      get_config('cifar100_gendd', 'resnet8-resnet8', tiny=True)
    with self.assertRaisesRegex(ValueError, 'no variant'):
      get_config('r50_600ep', 'r50')


class _TwoSteps(absltest.TestCase):
  """Two steps of each stage of one config variant's `:tiny` form."""

  def run_config(self, stem, variant, grain):
    c = get_config(stem, variant, tiny=True)
    if grain:  # A random teacher export replaces the random teacher.
      c = on_grain(c, get_config(stem, variant))
      with c.unlocked():
        c.pipeline.stages = tuple(
            s for s in c.pipeline.stages if s != 'teacher')
      settings = tuple(sorted(
          (k, v) for k, v in c.teacher.items()
          if k not in ('model', 'checkpoint', 'source', 'features',
                       'init_from')))
      c.teacher.checkpoint = random_teacher(c.teacher.model, settings,
                                            _CLASSES, (32, 32, 3))
      c.teacher.source = 'model'  # The export, not tiny's random teacher.
    if c.stage == 'pipeline' and c.pipeline.protocol == 'kfold':
      # Two folds of every stage are traced by TracedTest.
      c.pipeline.stages = ('teacher', 'gendd')
    stages = stages_of(c)
    workdir = os.path.join(_TMP.name, 'runs', f'{stem}_{variant}')
    if c.stage == 'pipeline':
      out = pipeline.run(c, workdir)
      if c.pipeline.protocol == 'sequence':
        self.assertEqual(tuple(out['stages']), stages)
        for stage in stages:
          self.assertEqual(out['stages'][stage]['steps'], 2)
      else:
        self.assertIn('gendd', out['methods'])
    else:
      res = train.train_and_evaluate(c, workdir, quiet=True)
      self.assertEqual(res['steps'], 2)


def _two_steps_class(family, stem, variant, grain):
  def test_two_steps_of_every_stage(self):
    self.run_config(stem, variant, grain)

  name = f'TwoSteps_{family}'
  return name, type(name, (_TwoSteps,), {
      'test_two_steps_of_every_stage': test_two_steps_of_every_stage})


# One class per family: parallel workers take whole classes.
for _family, ((_stem, _variant), _grain, _) in FAMILIES.items():
  _name, _cls = _two_steps_class(_family, _stem, _variant, _grain)
  globals()[_name] = _cls
del _cls  # Only the named copies are test classes.


def _info(c) -> dict:
  ds = data_lib.open_dataset(c.data, c.seed)
  return dict(ds.info, steps_per_epoch=ds.train.steps_per_epoch)


_CONV_DOT = ('conv_general_dilated', 'dot_general')


def compute_dtypes_of(fn, *args) -> tuple[set, list]:
  """The operand dtypes of every convolution and matmul `fn` runs, and the
  shapes of its outputs (one trace)."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _CONV_DOT:
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jex_core.jaxprs_in_params(eqn.params):
        walk(sub)

  closed = jax.make_jaxpr(fn)(*args)
  walk(closed.jaxpr)
  return found, [tuple(a.shape) for a in closed.out_avals]


def _forward(module, x):
  """`(feature shape, logits shape, conv/matmul dtypes)` of a backbone's
  forward, traced (nothing computed)."""
  graphdef, state = nnx.split(module)

  def fn(state, x):
    return nnx.merge(graphdef, state)(x)

  dtypes, (feat, logits) = compute_dtypes_of(fn, state, x)
  return feat, logits, dtypes


class TracedTest(parameterized.TestCase):
  """Every config and variant in its `:tiny` form, traced (no compute):
  each stage's model builds with matching widths, and the configured compute
  dtype per role is what the built models run: every convolution and matmul
  of the traced teacher and student forwards, and the `dtype` of every layer
  of the diffusion head. (`TwoSteps_*` train one member of each family.)"""

  CASES = all_configs()

  @parameterized.named_parameters(*[(_case_name(*p),) + p for p in CASES])
  def test_models_build_and_compute_in_the_configured_dtype(self, stem,
                                                            variant):
    c = get_config(stem, variant, tiny=True)
    full = get_config(stem, variant)
    name = f'{stem}:{variant}'
    self.assertEqual(c.precision.to_dict(), full.precision.to_dict())
    self.assertEqual((c.teacher.model, c.student.model),
                     (full.teacher.model, full.student.model))
    if stem == 'cifar100_gendd':
      self.assertEqual((c.teacher.model, c.student.model),
                       tuple(variant.split('-')))
      self.assertEqual(c.gendd.smooth, config_lib.CIFAR_PAIRS[variant])
    info = _info(c)
    x = jax.ShapeDtypeStruct((2,) + tuple(info['input_shape']), jnp.float32)
    want = {r: jnp.dtype(precision.compute_dtype(c.precision[r])).name
            for r in ('student', 'teacher', 'head')}
    # The teacher as distillation loads it.
    t_feat, t_logits, got = _forward(
        nnx.eval_shape(lambda: precision.set_compute_dtype(
            stages_lib.create_backbone(c.teacher, info, 0),
            c.precision.teacher)), x)
    self.assertEqual(got, {want['teacher']}, f'teacher of {name}')
    self.assertEqual(t_feat, (2, stages_lib.teacher_feature_dim(c, info)))
    self.assertEqual(t_logits, (2, info['num_classes']))
    for stage in stages_of(c):
      if stage == 'teacher':  # Built as above, in its own role's dtype.
        continue
      model = nnx.eval_shape(
          lambda s=stage: stages_lib.get(s).create_model(c, info))
      backbone = model.backbone if hasattr(model, 'backbone') else model
      feat, logits, got = _forward(backbone, x)
      self.assertEqual(got, {want['student']}, f'{stage} of {name}')
      self.assertEqual(logits, (2, info['num_classes']), f'{stage} of {name}')
      if hasattr(model, 'head'):
        self.assertEqual(t_feat[1] % c.gendd.token_dim, 0, name)
        layers = [n for _, n in nnx.iter_graph(model.head)
                  if isinstance(n, nnx.Module) and hasattr(n, 'dtype')]
        self.assertNotEmpty(layers)
        got = {None if n.dtype is None else jnp.dtype(n.dtype).name
               for n in layers}
        # float32: layers as built (None: they compute in their inputs'
        # dtype, float32 here); otherwise every layer in the configured one.
        allowed = ({None, 'float32'} if want['head'] == 'float32'
                   else {want['head']})
        self.assertLessEqual(got, allowed, f'{stage} head of {name}')
        self.assertEqual(
            model.head.input_proj.kernel.shape[0], c.gendd.token_dim, name)
        self.assertEqual(model.cls_projector.scale.shape, feat[1:], name)


class ScheduleMathTest(parameterized.TestCase):
  """Steps, warm-up and batch split of the real configs on their real
  datasets and a reference device count."""

  @parameterized.named_parameters(
      # name, config, variant, train examples, devices, accumulation,
      # expected (steps/epoch, stage-2 steps, warm-up steps, per device).
      ('r50_600ep_v4_32', 'r50_600ep', '', 'imagenet2012', 16, 1,
       (2502, 1_501_200, 50_040, 32)),
      ('r50_600ep_v4_8_accum4', 'r50_600ep', '', 'imagenet2012', 4, 4,
       (2502, 1_501_200, 50_040, 32)),
      ('r18_from_r34_8gpu', 'r18_from_r34', '', 'imagenet2012', 8, 1,
       (2502, 250_200, 25_020, 64)),
      ('mbv1_warmup20', 'mbv1_from_r50', '', 'imagenet2012', 8, 1,
       (2502, 250_200, 50_040, 64)),
      ('imagenet_lt_batch256', 'imagenet_lt', 'r50', 'imagenet_lt', 8, 1,
       (452, 45_200, 9_040, 32)),
      ('cc3m', 'cc3m_unsup', 'r18', 'cc3m', 8, 1,
       (5628, 562_800, 112_560, 64)),
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

  def test_released_recipes(self):
    # The values the authors' scripts and argparse defaults give (the
    # sources are listed in docs/recipes.md).
    def main_stage(c):
      return c.stages[[s for s in c.pipeline.stages if s != 'stage1'][0]]
    imagenet = {  # config -> (warm-up, feature-mixup beta, stages)
        ('r18_from_r34', ''): (10, 1.0, ('stage1', 'gendd')),
        ('mbv1_from_r50', ''): (20, 1.0, ('stage1', 'gendd')),
        ('r50_from_beitv2b', ''): (20, 0.0, ('stage1', 'gendd')),
        ('r50_from_beitv2l', ''): (20, 0.0, ('stage1', 'gendd')),
        ('r50_600ep', ''): (20, 0.0, ('stage1', 'gendd')),
        ('imagenet_lt', 'r50'): (20, 1.0, ('gendd',)),
        ('imagenet_lt', 'r18'): (20, 1.0, ('gendd',)),
        ('cc3m_unsup', 'r18'): (20, 1.0, ('gendd_unsup',)),
        ('cc3m_unsup', 'mbv1'): (20, 1.0, ('gendd_unsup',)),
    }
    for (stem, variant), (warmup, beta, flow) in imagenet.items():
      c = get_config(stem, variant)
      name = f'{stem}:{variant}'
      self.assertEqual((main_stage(c).warmup_epochs, c.gendd.beta,
                        tuple(c.pipeline.stages)), (warmup, beta, flow), name)
      self.assertEqual(main_stage(c).min_lr, 1e-6, name)
      self.assertEqual(tuple(c.no_decay), ('head',), name)
      self.assertEqual(c.sampler.eval_num_sampling, 5, name)
    r18 = get_config('r18_from_r34', '')
    self.assertEqual(settings.stage_data(r18, 'stage1').crop_scale, 0.08)
    self.assertEqual(settings.stage_data(r18, 'gendd').crop_scale, 0.6)
    self.assertEqual(r18.data.crop_scale, 0.6)  # Untouched.
    kl = get_config('cc3m_unsup', 'mbv1_kl')
    s = kl.stages.kl
    self.assertEqual((s.optimizer, s.lr, s.b1, s.weight_decay,
                      s.warmup_epochs, s.epochs, tuple(s.frozen)),
                     ('sgd', 0.2, 0.9, 1e-4, 10, 100, ('fc',)))
    self.assertEqual(kl.kd.temperature, 1.0)
    # The frozen names reach exactly the student's classifier.
    spec = settings.optim_spec(kl, 'kl', 5628)
    model = nnx.eval_shape(lambda: stages_lib.get('kl').create_model(
        kl, dict(num_classes=1000, input_shape=(224, 224, 3))))
    _, params, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    mask = optim.frozen_mask(spec.frozen)(params)
    frozen = sorted(jax.tree_util.keystr(p) for p, v in
                    jax.tree_util.tree_leaves_with_path(mask) if v)
    self.assertLen(frozen, 2, frozen)
    self.assertTrue(all("['fc']" in p for p in frozen), frozen)
    for pair in config_lib.CIFAR_PAIRS:
      c = get_config('cifar100_gendd', pair)
      s = c.stages.gendd
      self.assertEqual((s.schedule, tuple(s.decay_epochs), s.decay_rate,
                        s.warmup_epochs), ('step', (150, 180, 210), 0.1, 50),
                       pair)
      low = pair.split('-')[1] in ('mobilenetv2', 'shufflev1', 'shufflev2')
      self.assertEqual(s.lr, 0.01 if low else 1e-3, pair)
      self.assertEqual((c.gendd.beta, tuple(c.no_decay),
                        c.sampler.eval_num_sampling), (1.0, ('head',), 5))

  def test_unknown_variant(self):
    with self.assertRaisesRegex(ValueError, 'unknown CIFAR-100 pair'):
      get_config('cifar100_gendd', 'resnet8-resnet8')
    with self.assertRaisesRegex(ValueError, 'unknown variant'):
      get_config('cc3m_unsup', 'r50')


if __name__ == '__main__':
  absltest.main()
