"""Training and evaluation of every stage: state, jitted steps, the loop.

Stages (``config.stage``):
  teacher      supervised training of the teacher (all labels);
  scratch      supervised training of the student (labelled subset only);
  kd           Hinton KD: temperature KL to the teacher + CE on labels;
  kl           unsupervised KL to the teacher's softmax (no labels at all);
  stage1       warm-up: student feature -> projection -> frozen teacher
               classifier, CE on labels;
  gendd        GenDD: diffusion head generates the (contracted) teacher feature
               from the student feature, plus the linear probe;
  gendd_unsup  GenDD with smooth 0 and no labels anywhere (no probe).

Each stage has one jitted train step and one jitted eval step, built once per
static setting and reused (a k-fold protocol compiles each stage once).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import data as data_lib
from gendd_jax import diffusion
from gendd_jax import gendd
from gendd_jax import modeling
from gendd_jax import models
from gendd_jax import optim
from gendd_jax import precision
from gendd_jax import sharding
from gendd_jax.data import features
from gendd_jax.errors import ConfigError
from gendd_jax.errors import NonFiniteError
from gendd_jax.errors import Preempted
from gendd_jax.modeling import compute_dtypes
from gendd_jax.modeling import create_backbone
from gendd_jax.modeling import create_model
from gendd_jax.modeling import teacher_feature_dim  # noqa: F401 (API)

STAGES = ('teacher', 'scratch', 'kd', 'kl', 'stage1', 'gendd', 'gendd_unsup')
# Label use per stage: every label, the student's labelled subset, or none.
LABELS = dict(teacher='all', scratch='subset', kd='subset', kl='none',
              stage1='subset', gendd='subset', gendd_unsup='none')
NEEDS_TEACHER = ('kd', 'kl', 'stage1', 'gendd', 'gendd_unsup')


# ---------------------------------------------------------------------------
# Static settings of the jitted steps.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything the jitted steps close over; hashable so builds are cached."""
  stage: str
  graphdef: Any
  teacher_graphdef: Any
  optim: optim.OptimSpec
  seed: int
  mesh: Any
  kd_temperature: float = 4.0
  ce_weight: float = 1.0
  kd_weight: float = 1.0
  smooth: float = 0.0
  beta: float = 0.0
  loss: gendd.LossSettings | None = None
  sample: gendd.SampleSettings | None = None
  noise_schedule: str = 'cosine'
  diffusion_steps: int = 1000
  sampling_steps: str = '64'
  # Clip the sampler's x0 estimate to the training targets' range (the bound
  # is data, passed in `teacher['clip_bound']`, so folds share one compile).
  clip_to_data: bool = False
  # Also evaluate the data-clipped sampler beside the configured one.
  also_clipped: bool = False
  # Teacher outputs come precomputed in the batch (`teacher_feature`,
  # `teacher_logits`); the training step runs no teacher forward.
  precomputed: bool = False
  # Gradient accumulation: the batch is split into this many micro-batches
  # whose gradients are averaged before one optimizer update.
  accum_steps: int = 1


def _merge(graphdef, variables):
  return nnx.merge(graphdef, variables['params'], variables['batch_stats'])


def _teacher_forward(spec: StepSpec, teacher, image, batch=None):
  if spec.precomputed and batch is not None:
    return precision.to_float32((batch.get('teacher_feature'),
                                 batch.get('teacher_logits')))
  model = _merge(spec.teacher_graphdef, teacher)
  feat, logits = precision.to_float32(model(image, train=False))
  return jax.lax.stop_gradient(feat), jax.lax.stop_gradient(logits)


def _classifier(teacher) -> tuple[jax.Array, jax.Array]:
  return modeling.classifier(teacher['params'])


def _normalise(teacher, target):
  stats = teacher['target_stats']
  return (target - stats['mean']) / stats['std']


def _losses(spec: StepSpec, schedule, params, batch_stats, teacher, batch,
            key):
  """Stage loss and metrics; returns `(loss, (metrics, new_batch_stats))`."""
  # Fresh Variables at this trace level: BatchNorm updates its statistics in
  # place, which NNX allows only on Variables created in the current trace.
  batch_stats = jax.tree.map(lambda x: x, batch_stats)
  model = nnx.merge(spec.graphdef, params, batch_stats)
  image = batch['image']
  labels = batch.get('label')  # Absent for label-free stages.
  mask = batch.get('label_mask')
  metrics = {}
  if spec.stage in ('teacher', 'scratch', 'kd', 'kl'):
    _, logits = precision.to_float32(model(image, train=True))
    if spec.stage in ('teacher', 'scratch'):
      loss = gendd.cross_entropy(logits, labels, mask)
    else:
      _, t_logits = _teacher_forward(spec, teacher, image, batch)
      kl = gendd.distill_kl(logits, t_logits, spec.kd_temperature)
      metrics['kl'] = kl
      loss = spec.kd_weight * kl
      if spec.stage == 'kd':
        ce = gendd.cross_entropy(logits, labels, mask)
        metrics['ce'] = ce
        loss = loss + spec.ce_weight * ce
  elif spec.stage == 'stage1':
    w, b = _classifier(teacher)
    logits = precision.to_float32(model(image, w, b, train=True))
    loss = gendd.cross_entropy(logits, labels, mask)
  else:  # gendd, gendd_unsup
    t_feat, _ = _teacher_forward(spec, teacher, image, batch)
    w, _ = _classifier(teacher)
    target = gendd.contract_target(t_feat, labels, w, spec.smooth, mask)
    if 'target_stats' in teacher:
      target = _normalise(teacher, target)
    z, probe_logits, _ = precision.to_float32(model.student(image,
                                                            train=True))
    k_mix, k_diff = jax.random.split(key)
    z, target = gendd.mix_features(k_mix, z, target, spec.beta)
    loss, aux = gendd.diffusion_loss(model.head, schedule,
                                     k_diff, z, target, spec.loss)
    metrics.update(diffusion=loss, mse=aux['mse'], vb=aux['vb'])
    if labels is not None:
      probe = gendd.cross_entropy(probe_logits, labels, mask)
      metrics['probe_ce'] = probe
      loss = loss + probe
  metrics['loss'] = loss
  return loss, (metrics, nnx.state(model, nnx.BatchStat))


@functools.lru_cache(maxsize=None)
def build_steps(spec: StepSpec) -> tuple[Callable, Callable]:
  """The jitted `(train_step, eval_step)` for `spec` (cached)."""
  tx = optim.create_optimizer(spec.optim)
  rep = sharding.replicated(spec.mesh)
  dat = sharding.data_sharded(spec.mesh)
  base_key = jax.random.key(spec.seed)
  # Built eagerly (numpy tables), then closed over as constants.
  train_sched = diffusion.create_schedule(spec.noise_schedule,
                                          spec.diffusion_steps, '')
  sample_sched = gendd.sampling_schedule(
      spec.noise_schedule, spec.diffusion_steps, spec.sampling_steps,
      spec.sample.sampler if spec.sample else 'ancestral')

  grad_fn = jax.grad(functools.partial(_losses, spec, train_sched),
                     has_aux=True)

  def accumulated_grads(params, batch_stats, teacher, batch, key):
    """Mean gradient and metrics over `accum_steps` micro-batches.

    Micro-batch `i` takes rows `i, i + A, i + 2A, ...` of the batch, so on a
    data-sharded batch every device contributes its own rows to each
    micro-batch (no data movement). BatchNorm statistics are threaded through
    the micro-batches in order.
    """
    a = spec.accum_steps
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(
            x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), batch)

    def body(carry, inp):
      acc, bs = carry
      mb, i = inp
      g, (m, bs) = grad_fn(params, bs, teacher, mb,
                           jax.random.fold_in(key, i))
      return (jax.tree.map(jnp.add, acc, g), bs), m

    zeros = jax.tree.map(jnp.zeros_like, params)
    (acc, new_bs), ms = jax.lax.scan(body, (zeros, batch_stats),
                                     (micro, jnp.arange(a)))
    grads = jax.tree.map(lambda g: g / a, acc)
    return grads, (jax.tree.map(lambda m: jnp.mean(m, 0), ms), new_bs)

  def train_step(state, teacher, batch):
    step = state['step']
    key = jax.random.fold_in(base_key, step)
    if spec.accum_steps == 1:
      grads, (metrics, new_bs) = grad_fn(
          state['params'], state['batch_stats'], teacher, batch, key)
    else:
      grads, (metrics, new_bs) = accumulated_grads(
          state['params'], state['batch_stats'], teacher, batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'],
                                   state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = optim.learning_rate(spec.optim)(step)
    # A non-finite loss or gradient leaves the state as it was (the host
    # stops or skips, see `on_nonfinite`); finite steps are unaffected.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    keep = functools.partial(jax.tree.map,
                             lambda new, old: jnp.where(finite, new, old))
    params = keep(params, state['params'])
    opt_state = keep(opt_state, state['opt_state'])
    new_bs = keep(new_bs, state['batch_stats'])
    metrics['nonfinite'] = jnp.logical_not(finite).astype(jnp.int32)
    new_state = dict(step=step + 1, params=params, batch_stats=new_bs,
                     opt_state=opt_state)
    return new_state, metrics

  def eval_step(state, teacher, batch, index):
    model = nnx.merge(spec.graphdef, state['params'], state['batch_stats'])
    image = batch['image']
    out, diag = {}, {}
    if spec.stage in ('teacher', 'scratch', 'kd', 'kl'):
      out['acc'] = model(image)[1]
    elif spec.stage == 'stage1':
      w, b = _classifier(teacher)
      out['acc'] = model(image, w, b)
    else:
      z, probe_logits, _ = precision.to_float32(model.student(image))
      key = jax.random.fold_in(jax.random.fold_in(base_key, 1 << 30), index)
      w, b = _classifier(teacher)
      variants = {'sampled_acc': spec.sample}
      if spec.clip_to_data or spec.also_clipped:
        clipped = spec.sample._replace(clip_x0=teacher['clip_bound'])
        name = 'sampled_acc' if spec.clip_to_data else 'sampled_clip_acc'
        variants[name] = clipped
      t_feat, _ = _teacher_forward(spec, teacher, image)
      t_norm = jnp.linalg.norm(t_feat, axis=-1) + 1e-12
      for name, settings in variants.items():
        # The same key: both samplers start from the same noise.
        feat = gendd.sample_features(model.head, sample_sched, key, z,
                                     settings)
        if 'target_stats' in teacher:
          stats = teacher['target_stats']
          feat = feat * stats['std'] + stats['mean']
        out[name] = feat @ w.T + b
        # Diagnostic: how far the sampler's output scale drifts from the
        # teacher's (error amplification shows up as ratios >> 1).
        diag[name.replace('_acc', '_norm_ratio')] = (
            jnp.linalg.norm(feat, axis=-1) / t_norm)
      if spec.stage == 'gendd':
        out['probe_acc'] = probe_logits
    preds = {k: jnp.argmax(v, -1).astype(jnp.int32) for k, v in out.items()}
    return preds, diag

  train_jit = jax.jit(train_step, in_shardings=(rep, rep, dat),
                      out_shardings=(rep, rep), donate_argnums=(0,))
  eval_jit = jax.jit(eval_step, in_shardings=(rep, rep, dat, None),
                     out_shardings=dat)
  return train_jit, eval_jit


# ---------------------------------------------------------------------------
# Building models and state.
# ---------------------------------------------------------------------------


def _variables(module) -> dict[str, Any]:
  _, params, bs = nnx.split(module, nnx.Param, nnx.BatchStat)
  return dict(params=params, batch_stats=bs)


def load_teacher(config, info, mesh) -> tuple[Any, dict[str, Any]]:
  """`(graphdef, variables)` of the frozen teacher in
  `config.teacher.checkpoint`."""
  path = config.teacher.checkpoint
  if not path:
    raise ConfigError(f'stage {config.stage!r} needs a teacher: set '
                      '--config.teacher.checkpoint=<export dir of a teacher '
                      'run>')
  graphdef, params, bs = nnx.split(
      precision.set_compute_dtype(
          nnx.eval_shape(lambda: create_backbone(config.teacher, info, 0)),
          compute_dtypes(config)['teacher']),
      nnx.Param, nnx.BatchStat)
  abstract = dict(params=params, batch_stats=bs)
  meta = ckpt_lib.load_export_meta(path)
  stored_model = meta.get('model')
  if stored_model and stored_model != config.teacher.model:
    raise ConfigError(
        f'teacher at {path} is a {stored_model!r}, but config.teacher.model '
        f'is {config.teacher.model!r}')
  if meta.get('num_classes') != info['num_classes']:
    raise ConfigError(
        f'teacher at {path} has {meta.get("num_classes")} classes, the '
        f'dataset has {info["num_classes"]}')
  tree, _ = ckpt_lib.load_export(
      path, ckpt_lib.abstract_like(abstract, sharding.replicated(mesh)))
  return graphdef, tree


def load_backbone_init(config, info, module, mesh) -> None:
  """Initialises `module.backbone` from an earlier stage's export."""
  path = config.student.init_from
  meta = ckpt_lib.load_export_meta(path)
  src_stage = meta.get('stage')
  src = nnx.eval_shape(lambda: create_model(config, info, src_stage))
  abstract = ckpt_lib.abstract_like(_variables(src), sharding.replicated(mesh))
  tree, _ = ckpt_lib.load_export(path, abstract)
  bb_params = tree['params']['backbone'] if 'backbone' in tree['params'] \
      else tree['params']
  nnx.update(module.backbone, bb_params)
  if len(tree['batch_stats']):
    bs = tree['batch_stats']
    nnx.update(module.backbone, bs['backbone'] if 'backbone' in bs else bs)


def optim_spec(config, stage: str, steps_per_epoch: int) -> optim.OptimSpec:
  """The optimizer settings of `stage`, validated."""
  if stage not in config.stages:
    raise ConfigError(f'this config has no optimiser settings for stage '
                      f'{stage!r} (config.stages has '
                      f'{", ".join(config.stages)})')
  s = config.stages[stage]
  total = int(s.epochs * steps_per_epoch)
  if total <= 0:
    raise ConfigError(f'stage {stage!r} has no training steps '
                      f'(epochs={s.epochs})')
  if s.schedule not in optim.SCHEDULES:
    raise ConfigError(f'stages.{stage}.schedule={s.schedule!r}; expected one '
                      f'of {", ".join(optim.SCHEDULES)}')
  if s.optimizer not in optim.OPTIMIZERS:
    raise ConfigError(f'stages.{stage}.optimizer={s.optimizer!r}; expected '
                      f'one of {", ".join(optim.OPTIMIZERS)}')
  return optim.OptimSpec(
      name=s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
      total_steps=total, warmup_steps=int(s.warmup_epochs * steps_per_epoch),
      schedule=s.schedule,
      boundaries=tuple(int(e * steps_per_epoch) for e in s.decay_epochs),
      decay_rate=s.decay_rate, min_lr=s.min_lr, b1=s.b1,
      nesterov=bool(s.nesterov), beta2_min=s.beta2_min, beta2_max=s.beta2_max,
      no_decay=tuple(config.no_decay))


def make_spec(config, stage, graphdef, teacher_graphdef, ospec, mesh
              ) -> StepSpec:
  """The static step settings of `stage`, validated."""
  g, smp = config.gendd, config.sampler
  kw = {}
  if stage in ('gendd', 'gendd_unsup'):
    try:  # Validate the schedules here, as configuration errors.
      diffusion.respaced_tables(g.noise_schedule, g.diffusion_steps,
                                str(smp.steps))
    except ValueError as e:
      raise ConfigError(f'gendd.noise_schedule / sampler.steps: {e}') from e
    if smp.get('kind', 'ancestral') not in diffusion.SAMPLERS:
      raise ConfigError(f'sampler.kind={smp.kind!r}; expected one of '
                        f'{", ".join(diffusion.SAMPLERS)}')
    try:
      clip = gendd.parse_clip_x0(smp.clip_x0)
    except ValueError as e:
      raise ConfigError(f'sampler.{e}') from None
    kw = dict(
        smooth=0.0 if stage == 'gendd_unsup' else float(g.smooth),
        beta=float(g.beta),
        loss=gendd.LossSettings(g.token_dim, g.diffusion_batch_mul,
                                float(g.cond_drop_prob), bool(g.use_vb)),
        sample=gendd.SampleSettings(g.token_dim, smp.num_sampling,
                                    float(smp.cfg_scale),
                                    float(smp.temperature),
                                    None if clip == 'data' else clip,
                                    sampler=smp.get('kind', 'ancestral')),
        noise_schedule=g.noise_schedule, diffusion_steps=g.diffusion_steps,
        sampling_steps=str(smp.steps),
        clip_to_data=clip == 'data',
        also_clipped=bool(smp.also_eval_clipped) and clip is None)
  return StepSpec(stage=stage, graphdef=graphdef,
                  teacher_graphdef=teacher_graphdef, optim=ospec,
                  seed=config.seed, mesh=mesh,
                  accum_steps=int(config.grad_accum_steps),
                  kd_temperature=float(config.kd.temperature),
                  ce_weight=float(config.kd.ce_weight),
                  kd_weight=float(config.kd.kd_weight), **kw)


def target_stats(config, teacher, teacher_graphdef, batches, mesh
                 ) -> tuple[dict[str, jax.Array] | None, float]:
  """Target standardisation statistics and the data range for x0 clipping.

  With `gendd.target_norm == 'standardize'` the diffusion head generates
  `(target - mean) / std` (per dimension, over the training set's teacher
  features) and samples are mapped back before classification. The returned
  bound is the largest absolute value, in the head's target space, of any
  teacher feature or classifier row, so it bounds every contracted target.
  """
  norm = config.gendd.target_norm
  if norm not in ('none', 'standardize'):
    raise ConfigError(f"unknown gendd.target_norm {norm!r}; expected 'none' "
                      "or 'standardize'")
  model = nnx.merge(teacher_graphdef, teacher['params'],
                    teacher['batch_stats'])
  fwd = jax.jit(lambda x: model(x)[0])
  feats = []
  for b in batches:  # This process's slice of each global batch.
    f, valid = fwd(jnp.asarray(b['image'])), b['valid']
    if jax.process_count() > 1:  # Same statistics on every process.
      f, valid = multihost_utils.process_allgather((f, valid), tiled=True)
    feats.append(np.asarray(f)[np.asarray(valid) > 0])
  feats = np.concatenate(feats)
  w = np.asarray(_classifier(teacher)[0])
  if norm == 'none':
    return None, float(max(np.abs(feats).max(), np.abs(w).max()))
  mean = feats.mean(0)
  std = feats.std(0) + 1e-3 * (feats.std() + 1e-6)
  bound = max(np.abs((feats - mean) / std).max(),
              np.abs((w - mean) / std).max())
  rep = sharding.replicated(mesh)
  stats = dict(mean=jax.device_put(jnp.asarray(mean), rep),
               std=jax.device_put(jnp.asarray(std), rep))
  return stats, float(bound)


def create_mesh(config):
  """The mesh of `config.mesh`, with the batch sizes checked against it."""
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f'grad_accum_steps must be a positive integer, got '
                      f'{accum!r}')
  try:
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh,
                              'eval batch size')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  n = mesh.devices.size
  if config.data.batch_size % (n * accum):
    raise ConfigError(
        f'batch size {config.data.batch_size} is not divisible by '
        f'{n} devices x grad_accum_steps {accum}')
  return mesh


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _mb(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB' if n < 2**30 else f'{n / 2**30:,.2f} GiB'


def startup_summary(config, stage: str, mesh, module, teacher, info,
                    steps_per_epoch: int) -> str:
  """What the run is about to do: devices, batch split, parameters and a
  per-device memory estimate of the persistent state (parameters, optimizer
  state, frozen teacher, one input batch; activations not included)."""
  n = mesh.devices.size
  accum = config.grad_accum_steps
  gb = config.data.batch_size
  params = nnx.state(module, nnx.Param)
  counts = {}
  for name in ('backbone', 'head', 'cls_projector', 'proj'):
    sub = getattr(module, name, None)
    if isinstance(sub, nnx.Module):
      counts[name] = models.param_count(sub)
  total = models.param_count(module)
  ospec = optim_spec(config, stage, steps_per_epoch)
  opt_bytes = _nbytes(jax.eval_shape(optim.create_optimizer(ospec).init,
                                     params))
  p_bytes = _nbytes(params) + _nbytes(nnx.state(module, nnx.BatchStat))
  t_bytes = _nbytes(teacher) if teacher else 0
  in_bytes = (gb // n // accum) * int(np.prod(info['input_shape'])) * 4
  dtypes = compute_dtypes(config)
  parts = ', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items())
  lines = [
      f'[{stage}] mesh {sharding.describe(mesh)}',
      f'[{stage}] global batch {gb} = {n} device(s) x {gb // n // accum} '
      f'per device x {accum} accumulation step(s); {steps_per_epoch} '
      f'steps/epoch x {config.stages[stage].epochs:g} epochs = '
      f'{ospec.total_steps} steps',
      f'[{stage}] trainable parameters {total / 1e6:.2f}M'
      + (f' ({parts})' if parts else '')
      + (f'; frozen teacher {_count(teacher["params"]) / 1e6:.2f}M'
         if teacher else ''),
      f'[{stage}] compute dtypes student {dtypes["student"]}, head '
      f'{dtypes["head"]}, teacher {dtypes["teacher"]}; parameters and '
      'optimizer state float32',
      f'[{stage}] memory per device (persistent state): parameters '
      f'{_mb(p_bytes)} + optimizer {_mb(opt_bytes)} + gradients '
      f'{_mb(p_bytes)} + teacher {_mb(t_bytes)} + input micro-batch '
      f'{_mb(in_bytes)} = {_mb(2 * p_bytes + opt_bytes + t_bytes + in_bytes)}'
      ' (activations not included)',
  ]
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def _teacher_source(config, stage: str) -> bool:
  """Whether `stage` reads precomputed teacher outputs."""
  source = config.teacher.get('source', 'model')
  if source not in ('model', 'precomputed'):
    raise ConfigError(f"teacher.source={source!r}; expected 'model' or "
                      "'precomputed'")
  if source == 'model' or stage not in NEEDS_TEACHER or stage == 'stage1':
    return False
  if not config.teacher.get('features'):
    raise ConfigError("teacher.source='precomputed' needs "
                      'teacher.features=<output dir of gendd_jax.precompute>')
  return True


def _strip_labels(stage: str, batch: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
  use = LABELS[stage]
  keep = {'none': ('image',), 'all': ('image', 'label'),
          'subset': ('image', 'label', 'label_mask')}[use]
  keep += ('teacher_feature', 'teacher_logits')
  return {k: batch[k] for k in keep if k in batch}


def evaluate(eval_step, state, teacher, batches, mesh) -> dict[str, Any]:
  """Runs `eval_step` over `batches` (every example once, with `valid`
  masks); returns accuracies, predictions, labels and example ids."""
  preds: dict[str, list[np.ndarray]] = {}
  diags: dict[str, list[np.ndarray]] = {}
  labels, index = [], []
  for i, b in enumerate(batches):
    valid = b['valid'] > 0
    sb = sharding.shard_batch({'image': b['image']}, mesh)
    out = eval_step(state, teacher, sb, jnp.int32(i))
    lab, ids = b['label'], b['id']
    if jax.process_count() > 1:  # Every process sees every prediction.
      out, lab, ids = multihost_utils.process_allgather((out, lab, ids),
                                                        tiled=True)
      valid = b['valid_global'] > 0
    labels.append(np.asarray(lab)[valid])
    index.append(np.asarray(ids)[valid])
    for dest, values in zip((preds, diags), out):
      for k, v in values.items():
        dest.setdefault(k, []).append(np.asarray(v)[valid])
  labels, index = np.concatenate(labels), np.concatenate(index)
  preds = {k: np.concatenate(v) for k, v in preds.items()}
  accs = {k: float(np.mean(v == labels) * 100.0)
          for k, v in preds.items()}
  diag = {k: float(np.median(np.concatenate(v))) for k, v in diags.items()}
  return dict(accuracy=accs, predictions=preds, diagnostics=diag,
              labels=labels, index=index)


def _writer(workdir: str):
  """clu writers: TensorBoard event files (process 0) plus absl logging."""
  from clu import metric_writers  # Imports TensorFlow; only when training.
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def check_workdir(workdir: str) -> None:
  """Fails with one clear message if `workdir` cannot be written."""
  try:
    ckpt_lib.makedirs(workdir)
    # One probe per process: hosts may share the directory.
    probe = epath.Path(workdir) / f'.write_test.{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable: '
                      f'{e.strerror or e}') from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       quiet: bool = False) -> dict[str, Any]:
  """Trains `config.stage`, evaluates it, exports it; returns the results.

  Resumes from the latest checkpoint in `workdir/checkpoints` if present.
  Writes `results.json` and `export/` (weights for later stages/evaluation).
  """
  stage = config.stage
  if stage not in STAGES:
    raise ConfigError(f'unknown stage {stage!r}; expected one of '
                      f'{", ".join(STAGES)} (or "pipeline" in configs that '
                      'define one)')
  check_workdir(workdir)
  mesh = create_mesh(config)
  d = config.data
  dataset = data_lib.open_dataset(d, config.seed, jax.process_index(),
                                  jax.process_count())
  info, stream = dataset.info, dataset.train
  precomputed = _teacher_source(config, stage)
  if precomputed:
    stream, pmeta = features.train_stream(config, jax.process_index(),
                                          jax.process_count())
    if stage in ('kd', 'kl') and not pmeta['logits']:
      raise ConfigError(f'stage {stage!r} needs teacher logits; the features '
                        f'at {config.teacher.features} were written without '
                        '(set precompute.logits=True)')
  if LABELS[stage] != 'none' and not info['labelled']:
    raise ConfigError(f'stage {stage!r} needs labels; dataset {d.name!r} '
                      'has none (use kl or gendd_unsup)')

  module = create_model(config, info, stage)  # Checks settings before I/O.
  teacher, teacher_graphdef = {}, None
  if stage in NEEDS_TEACHER:
    teacher_graphdef, teacher = load_teacher(config, info, mesh)
  if stage != 'teacher' and config.student.init_from:
    load_backbone_init(config, info, module, mesh)
  rep = sharding.replicated(mesh)
  graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  if not quiet and jax.process_index() == 0:
    print(startup_summary(config, stage, mesh, module, teacher, info,
                          stream.steps_per_epoch), flush=True)
  ospec = optim_spec(config, stage, stream.steps_per_epoch)
  spec = make_spec(config, stage, graphdef, teacher_graphdef, ospec, mesh)
  spec = dataclasses.replace(spec, precomputed=precomputed)
  if stage in ('gendd', 'gendd_unsup'):
    stats, bound = target_stats(config, teacher, teacher_graphdef,
                                dataset.train_eval_batches(
                                    d.get('stats_batches') or None), mesh)
    if stats is not None:
      teacher['target_stats'] = stats
    teacher['clip_bound'] = jax.device_put(jnp.float32(bound), rep)
  train_step, eval_step = build_steps(spec)

  tx = optim.create_optimizer(ospec)
  state = jax.device_put(dict(
      step=jnp.int32(0), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params)), rep)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                               max_to_keep=config.keep_checkpoints)
  start = 0
  if ckpt.latest_step() is not None:
    # Falls back past unreadable checkpoints (moved aside, not deleted).
    state, ckpt_meta = ckpt.restore_latest_valid(
        ckpt_lib.abstract_like(state, rep),
        log=None if quiet else functools.partial(print, flush=True))
    start = int(state['step'])
    if 'data_state' in ckpt_meta:
      stream.set_state(ckpt_meta['data_state'])
    elif isinstance(stream, data_lib.ArrayStream):
      stream.step = start  # A checkpoint from before data states were kept.
    else:
      raise ckpt_lib.CheckpointError(
          f'checkpoint {ckpt.latest_step()} in {workdir} has no data-iterator '
          'state to resume the example stream from')
    if not quiet:
      print(f'[{stage}] resumed from step {start} ({workdir})', flush=True)

  total = ospec.total_steps
  # What a standalone export/evaluation of a checkpoint needs besides the
  # weights: the config and the target space of the diffusion head.
  ckpt_meta = dict(stage=stage, config=json.loads(config.to_json()),
                   num_classes=info['num_classes'],
                   input_shape=list(info['input_shape']))
  if 'clip_bound' in teacher:
    ckpt_meta['clip_bound'] = float(teacher['clip_bound'])
  if 'target_stats' in teacher:
    ckpt_meta['target_stats'] = {
        k: np.asarray(v).tolist() for k, v in teacher['target_stats'].items()}
  writer = _writer(workdir)
  if start == 0 and jax.process_index() == 0:
    writer.write_hparams({'stage': stage, 'total_steps': total,
                          'batch_size': d.batch_size})
  on_nonfinite = config.get('on_nonfinite', 'stop')
  if on_nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"on_nonfinite={on_nonfinite!r}; expected 'stop' or "
                      "'skip'")
  pending, skipped = [], []  # Non-finite flags not yet looked at.
  check = functools.partial(_check_finite, pending, workdir, ckpt,
                            on_nonfinite, skipped)
  watch = _PreemptionWatch().__enter__()
  try:
    t0 = time.time()
    last_t, last_step = t0, start
    history = []  # Periodic evaluations of this invocation.
    log_every = max(1, config.log_every_steps)
    for step in range(start, total):
      batch = sharding.shard_batch(_strip_labels(stage, next(stream)), mesh)
      state, metrics = train_step(state, teacher, batch)
      done = step + 1
      pending.append((done, metrics['nonfinite']))
      if done % log_every == 0 or done == total:
        check()
        metrics = jax.device_get(metrics)  # The only host sync in the loop.
        now = time.time()
        rate = (done - last_step) / max(now - last_t, 1e-9)
        last_t, last_step = now, done
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars['steps_per_sec'] = rate
        writer.write_scalars(done, scalars)
        if not quiet:
          eta = (total - done) / max(rate, 1e-9)
          print(f'[{stage}] step {done}/{total} loss {scalars["loss"]:.4f} '
                f'lr {scalars["lr"]:.2e} {rate:.1f} steps/s ETA {_hms(eta)}',
                flush=True)
      every = config.checkpoint_every_steps
      if every and done % every == 0 and done < total:
        check()  # Never checkpoint past an unnoticed bad step.
        ckpt.save(done, state, ckpt_meta,
                  data_state=stream.get_state())
      if done < total and watch.should_stop(done):
        check()
        if ckpt.latest_step() != done:
          ckpt.save(done, state, ckpt_meta, data_state=stream.get_state())
        ckpt.wait()
        waited = time.time() - (watch.received_at or time.time())
        raise Preempted(
            f'[{stage}] SIGTERM: saved checkpoint {done} of {workdir} '
            f'{waited:.1f}s after the signal; run the same command to '
            'resume')
      if (config.eval_every_steps and done % config.eval_every_steps == 0 and
          done < total):
        res = evaluate(eval_step, state, teacher, dataset.eval_batches(), mesh)
        history.append(dict(step=done, accuracy=res['accuracy']))
        writer.write_scalars(done, {f'eval/{k}': v
                                    for k, v in res['accuracy'].items()})
        if not quiet:
          accs = ', '.join(f'{k} {v:.2f}%' for k, v in res['accuracy'].items())
          print(f'[{stage}] eval at step {done}: {accs}', flush=True)
    train_time = time.time() - t0
    check()
    if start < total:
      ckpt.save(total, state, ckpt_meta,
                data_state=stream.get_state())
    t1 = time.time()
    res = evaluate(eval_step, state, teacher, dataset.eval_batches(), mesh)
    eval_time = time.time() - t1
    writer.write_scalars(total, {f'eval/{k}': v
                                 for k, v in res['accuracy'].items()})
    writer.flush()
  finally:
    watch.__exit__(None, None, None)
    ckpt.close()  # Waits for async saves, also on errors.

  export_tree = dict(params=state['params'],
                     batch_stats=state['batch_stats'])
  role = config.teacher if stage == 'teacher' else config.student
  meta = dict(ckpt_meta, model=role.model)
  # Every process takes part in the orbax save; process 0 writes the JSON.
  ckpt_lib.save_export(os.path.join(workdir, 'export'), export_tree, meta)
  results = dict(
      stage=stage, steps=total, train_seconds=train_time,
      skipped_nonfinite_steps=skipped,
      eval_seconds=eval_time, accuracy=res['accuracy'],
      diagnostics=res['diagnostics'], periodic_eval=history,
      predictions={k: v.tolist() for k, v in res['predictions'].items()},
      labels=res['labels'].tolist(), index=res['index'].tolist())
  if jax.process_index() == 0:
    ckpt_lib.write_text(os.path.join(workdir, 'results.json'),
                        json.dumps(results))
  return results


class _PreemptionWatch:
  """Turns SIGTERM into a flag the loop polls at step boundaries.

  On a multi-process run every process must stop at the same step: JAX's
  preemption sync point (which also hooks SIGTERM) decides there.
  """

  def __init__(self):
    self.received_at = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.received_at = self.received_at or time.time()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except (RuntimeError, ValueError):
        pass  # No preemption service (e.g. a local multi-process test).
    return self.received_at is not None


def _check_finite(pending: list, workdir: str, ckpt, mode: str,
                  skipped: list) -> None:
  """Looks at the non-finite flags of the steps since the last check."""
  if not pending:
    return
  flags = jax.device_get([f for _, f in pending])
  bad = [s for (s, _), f in zip(pending, flags) if int(f)]
  pending.clear()
  if not bad:
    return
  if mode == 'skip':
    skipped.extend(bad)
    print(f'warning: skipped {len(bad)} step(s) with a non-finite loss or '
          f'gradient (steps {", ".join(map(str, bad[:10]))}'
          f'{"..." if len(bad) > 10 else ""}); {len(skipped)} so far',
          flush=True)
    return
  raise NonFiniteError(
      f'non-finite loss or gradient at step {bad[0]} of {workdir} (its '
      f'update was not applied); last good checkpoint: '
      f'{ckpt.latest_step() if ckpt.latest_step() is not None else "none"}.'
      " Resume from it after fixing the cause, or set "
      "--config.on_nonfinite=skip to skip such steps")


def _hms(seconds: float) -> str:
  seconds = int(round(seconds)) if math.isfinite(seconds) else 0
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
