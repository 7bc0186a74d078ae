r"""Throughput benchmark: train-step and evaluation images/s, printed as JSON.

  python -m gendd_jax.bench [--settings=digits,head_only,cifar] [--repeats=5]

Settings:
  digits     the bundled example's GenDD stage (teacher MLP + student MLP +
             diffusion head) and its sampling evaluation;
  head_only  the ImageNet ResNet-50 teacher geometry without backbones:
             feature width 2048, token_dim 64, width 1024, depth 3,
             diffusion_batch_mul 10, batch 32, random features; evaluation is
             64-step CFG (scale 2) sampling at batch 32;
  cifar      the CIFAR-100 GenDD step of the paper: resnet32x4 teacher
             forward + resnet8x4 student + diffusion head (token_dim 64,
             width 1024, depth 3, diffusion_batch_mul 30, batch 64) and
             100-step CFG (scale 2) evaluation at batch 64;
  cifar_precomputed  the same step with precomputed teacher features in the
             batch (`teacher.source = 'precomputed'`): no teacher forward;
  imagenet, imagenet_precomputed  the train step of BEiT-v2-L -> ResNet-50
             at 224x224 (head token 64, width 1024, depth 3, mul 10, batch
             8), with and without the teacher forward (not run by default).
Each figure is the median over `repeats` timed runs after compilation.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time

from absl import app
from absl import flags

_SETTINGS = flags.DEFINE_list('settings', ['digits', 'head_only', 'cifar'],
                              'Which settings to run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats per figure.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Train steps per timed repeat.')


def _median_rate(fn, images_per_call: int, calls: int, repeats: int
                 ) -> dict[str, float]:
  """Images/s of `calls` calls of `fn` (which blocks), median of repeats."""
  fn()  # Compile and warm up.
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      fn()
    rates.append(images_per_call * calls / (time.perf_counter() - t0))
  return dict(images_per_sec=statistics.median(rates),
              min=min(rates), max=max(rates))


def bench_head_only(repeats: int, steps: int, *, feature_dim=2048,
                    token_dim=64, width=1024, depth=3, mul=10, batch=32,
                    sampling_steps='64', cfg_scale=2.0) -> dict:
  """GenDD head training and sampling on random 2048-d features."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gendd_jax import diffusion  # pylint: disable=g-import-not-at-top
  from gendd_jax import gendd  # pylint: disable=g-import-not-at-top
  from gendd_jax.models import denoiser  # pylint: disable=g-import-not-at-top

  class HeadOnly(nnx.Module):

    def __init__(self, rngs):
      self.cls_projector = nnx.LayerNorm(feature_dim, epsilon=1e-5,
                                         rngs=rngs)
      self.head = denoiser.DenoiserMLP(token_dim, feature_dim, width, depth,
                                       feature_dim // token_dim, rngs=rngs)

  graphdef, params = nnx.split(HeadOnly(nnx.Rngs(0)))
  tx = optax.adamw(1e-4, b2=0.96, weight_decay=0.0)
  opt_state = tx.init(params)
  train_sched = diffusion.create_schedule('cosine', 1000, '')
  sample_sched = diffusion.create_schedule('cosine', 1000, sampling_steps)
  loss_settings = gendd.LossSettings(token_dim, mul, 0.2, True)
  sample_settings = gendd.SampleSettings(token_dim, 1, cfg_scale, 1.0)
  keys = jax.random.split(jax.random.key(0), 3)
  feat_s = jax.random.normal(keys[0], (batch, feature_dim))
  feat_t = jax.random.normal(keys[1], (batch, feature_dim))

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      z = m.cls_projector(feat_s)
      return gendd.diffusion_loss(m.head, train_sched, key, z, feat_t,
                                  loss_settings)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def sample_step(params, key):
    m = nnx.merge(graphdef, params)
    return gendd.sample_features(m.head, sample_sched, key,
                                 m.cls_projector(feat_s), sample_settings)

  state = {'p': params, 'o': opt_state, 'k': 0}

  def train_once():
    state['k'] += 1
    p, o, loss = train_step(state['p'], state['o'],
                            jax.random.key(state['k']))
    state['p'], state['o'] = p, o
    loss.block_until_ready()

  def sample_once():
    sample_step(state['p'], keys[2]).block_until_ready()

  return dict(
      setting=dict(feature_dim=feature_dim, token_dim=token_dim, width=width,
                   depth=depth, diffusion_batch_mul=mul, batch=batch,
                   sampling_steps=sampling_steps, cfg_scale=cfg_scale),
      train=_median_rate(train_once, batch, steps, repeats),
      eval=_median_rate(sample_once, batch, 1, repeats))


def _bench_gendd(config, info, train_batch, eval_images, repeats: int,
                 steps: int, precomputed: bool = False) -> dict:
  """Times the full GenDD train step and sampling evaluation of `config`
  (randomly initialised teacher and student) on fixed batches; with
  `precomputed`, the batch carries the teacher features and the step runs
  no teacher forward (`teacher.source = 'precomputed'`)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gendd_jax import optim  # pylint: disable=g-import-not-at-top
  from gendd_jax import sharding  # pylint: disable=g-import-not-at-top
  from gendd_jax import train  # pylint: disable=g-import-not-at-top

  config.stage = 'gendd'
  config.sampler.also_eval_clipped = False  # Time one sampler pass.
  mesh = sharding.create_mesh(1)
  teacher_module = train.create_backbone(config.teacher, info, 0)
  t_graphdef, t_params, t_bs = nnx.split(teacher_module, nnx.Param,
                                         nnx.BatchStat)
  teacher = dict(params=t_params, batch_stats=t_bs)
  module = train.create_model(config, info, 'gendd')
  graphdef, params, bs = nnx.split(module, nnx.Param, nnx.BatchStat)
  ospec = train.optim_spec(config, 'gendd', 100)
  spec = train.make_spec(config, 'gendd', graphdef, t_graphdef, ospec, mesh)
  if precomputed:
    spec = dataclasses.replace(spec, precomputed=True)
    t_model = nnx.merge(t_graphdef, t_params, t_bs)
    train_batch = dict(train_batch, teacher_feature=np.asarray(
        jax.jit(lambda x: t_model(x)[0])(train_batch['image'])))
  train_step, eval_step = train.build_steps(spec)
  tx = optim.create_optimizer(ospec)
  rep = sharding.replicated(mesh)
  teacher = jax.device_put(teacher, rep)
  if spec.clip_to_data or spec.also_clipped:
    teacher['clip_bound'] = jax.device_put(jnp.float32(1.0), rep)
  state = {'s': jax.device_put(dict(step=jnp.int32(0), params=params,
                                    batch_stats=bs,
                                    opt_state=tx.init(params)), rep)}
  batch = sharding.shard_batch(train_batch, mesh)
  eval_in = sharding.shard_batch({'image': eval_images}, mesh)
  n_train, n_eval = len(train_batch['image']), len(eval_images)

  def train_once():
    state['s'], metrics = train_step(state['s'], teacher, batch)
    jax.block_until_ready(metrics['loss'])

  def eval_once():
    jax.block_until_ready(eval_step(state['s'], teacher, eval_in,
                                    jnp.int32(0)))

  g, smp = config.gendd, config.sampler
  evaluation = (_median_rate(eval_once, n_eval, 1, repeats) if n_eval
                else None)
  return dict(
      setting=dict(teacher=config.teacher.model, student=config.student.model,
                   teacher_source='precomputed' if precomputed else 'model',
                   batch=n_train, eval_batch=n_eval, token_dim=g.token_dim,
                   width=g.width, depth=g.depth,
                   diffusion_batch_mul=g.diffusion_batch_mul,
                   sampling_steps=smp.steps, cfg_scale=smp.cfg_scale,
                   num_sampling=smp.num_sampling),
      train=_median_rate(train_once, n_train, steps, repeats),
      eval=evaluation)


def bench_digits(repeats: int, steps: int) -> dict:
  """The digits config's GenDD stage: full train step and evaluation."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from gendd_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                      'digits.py')
  spec_ = importlib.util.spec_from_file_location('digits_config', path)
  mod = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(mod)
  config = mod.get_config()
  d = config.data
  tr, te, info = data_lib.create_splits(
      d.name, fold=0, num_folds=d.num_folds, label_fraction=d.label_fraction,
      seed=0)
  batches = data_lib.TrainBatches(tr, d.batch_size, 0)
  eval_batch = next(data_lib.eval_batches(te, d.eval_batch_size))
  return _bench_gendd(config, info, batches.batch(0), eval_batch['image'],
                      repeats, steps)


def bench_cifar(repeats: int, steps: int, *, teacher='resnet32x4',
                student='resnet8x4', batch=64, eval_batch=64, width=1024,
                depth=3, mul=30, sampling_steps='100',
                precomputed: bool = False) -> dict:
  """The CIFAR-100 GenDD step: teacher forward, student, diffusion head
  (token 64, width 1024, depth 3, diffusion_batch_mul 30, batch 64), and
  100-step CFG evaluation, on random 32x32 images (throughput does not
  depend on the pixels)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gendd_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.cifar100(teacher=teacher, student=student)
  config.gendd.width, config.gendd.depth = width, depth
  config.gendd.diffusion_batch_mul = mul
  config.sampler.steps = sampling_steps
  info = dict(num_classes=100, input_shape=(32, 32, 3))
  rng = np.random.default_rng(0)
  train_batch = dict(
      image=rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
      label=rng.integers(0, 100, batch).astype(np.int32),
      label_mask=np.ones(batch, bool))
  eval_images = rng.normal(size=(eval_batch, 32, 32, 3)).astype(np.float32)
  return _bench_gendd(config, info, train_batch, eval_images, repeats, steps,
                      precomputed)


def bench_imagenet(repeats: int, steps: int, *,
                   teacher='beitv2_large_patch16_224', student='resnet50',
                   batch=8, image_size=224, width=1024, depth=3, mul=10,
                   precomputed: bool = False) -> dict:
  """The ImageNet GenDD train step of the paper's strongest pair (BEiT-v2-L
  teacher, ResNet-50 student, head token 64 / width 1024 / depth 3 / mul
  10), with or without the teacher forward; training only (evaluation does
  not depend on where the training targets come from)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gendd_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.cifar100(teacher=teacher, student=student)
  config.gendd.width, config.gendd.depth = width, depth
  config.gendd.diffusion_batch_mul = mul
  config.sampler.steps = '64'
  info = dict(num_classes=1000, input_shape=(image_size, image_size, 3))
  rng = np.random.default_rng(0)
  train_batch = dict(
      image=rng.normal(size=(batch, image_size, image_size, 3)).astype(
          np.float32),
      label=rng.integers(0, 1000, batch).astype(np.int32),
      label_mask=np.ones(batch, bool))
  eval_images = np.zeros((0, image_size, image_size, 3), np.float32)
  return _bench_gendd(config, info, train_batch, eval_images, repeats, steps,
                      precomputed)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  out = dict(machine=dict(platform=platform.platform(),
                          processor=platform.processor(),
                          jax=jax.__version__,
                          devices=[str(d) for d in jax.devices()]),
             repeats=_REPEATS.value)
  runners = dict(digits=bench_digits, head_only=bench_head_only,
                 cifar=bench_cifar,
                 cifar_precomputed=functools.partial(bench_cifar,
                                                     precomputed=True),
                 imagenet=bench_imagenet,
                 imagenet_precomputed=functools.partial(bench_imagenet,
                                                        precomputed=True))
  for name in _SETTINGS.value:
    if name not in runners:
      raise app.UsageError(f'unknown setting {name!r}; expected one of '
                           f'{", ".join(runners)}')
    out[name] = runners[name](_REPEATS.value, _STEPS.value)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  app.run(main)
