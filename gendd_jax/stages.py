"""One record per training stage: what it sees, builds, optimises, predicts.

  teacher      supervised training of the teacher (all labels);
  scratch      supervised training of the student (labelled subset only);
  kd           Hinton KD: temperature KL to the teacher + CE on labels;
  kl           unsupervised KL to the teacher's softmax (no labels at all);
  stage1       warm-up: student feature -> projection -> frozen teacher
               classifier, CE on labels;
  gendd        GenDD: the diffusion head generates the (contracted) teacher
               feature from the student feature, plus the linear probe;
  gendd_unsup  GenDD with smooth 0 and no labels anywhere (no probe).

Every other module asks a `Stage` record instead of switching on names. The
loss and prediction functions run inside the jitted steps; they receive the
step settings `s` (`settings.StepSettings`), the merged model and the frozen
teacher (`teacher.Teacher`: `outputs`, `classifier`, `target_stats`,
`clip_bound`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gendd_jax import diffusion
from gendd_jax import gendd
from gendd_jax import models
from gendd_jax import precision
from gendd_jax.errors import ConfigError
from gendd_jax.models import distill

Batch = dict[str, jax.Array]
Logits = dict[str, jax.Array]
# Block keys of a `teacher`/`student` config that are not model arguments.
_NOT_MODEL_ARGS = ('model', 'checkpoint', 'init_from', 'source', 'features')


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


def create_backbone(cfg: ml_collections.ConfigDict, info, seed: int):
  """The backbone named by a `teacher`/`student` config block."""
  kwargs = {k: v for k, v in cfg.items() if k not in _NOT_MODEL_ARGS}
  return models.create_backbone(
      cfg.model, num_classes=info['num_classes'],
      input_shape=info['input_shape'], rngs=nnx.Rngs(seed), **kwargs)


def teacher_feature_dim(config, info) -> int:
  """The teacher's feature width (its shapes are built once per setting)."""
  kwargs = tuple(sorted(
      (k, tuple(v) if isinstance(v, list) else v)
      for k, v in config.teacher.items() if k not in _NOT_MODEL_ARGS))
  return _feature_dim(config.teacher.model, kwargs, info['num_classes'],
                      tuple(info['input_shape']))


@functools.lru_cache(maxsize=None)
def _feature_dim(model: str, kwargs: tuple, num_classes: int,
                 input_shape: tuple) -> int:
  return nnx.eval_shape(lambda: models.create_backbone(
      model, num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0), **dict(kwargs))).feature_dim


def _build_classifier(config, info, dtypes, role: str) -> nnx.Module:
  backbone = create_backbone(config[role], info, config.seed)
  return precision.set_compute_dtype(backbone, dtypes[role])


def _build_stage1(config, info, dtypes, role: str) -> nnx.Module:
  backbone = create_backbone(config[role], info, config.seed)
  model = distill.Stage1Model(backbone, teacher_feature_dim(config, info),
                              rngs=nnx.Rngs(config.seed + 1))
  return precision.set_compute_dtype(model, dtypes['student'])


def _build_gendd(config, info, dtypes, role: str) -> nnx.Module:
  backbone = create_backbone(config[role], info, config.seed)
  t_dim = teacher_feature_dim(config, info)
  g = config.gendd
  if t_dim % g.token_dim:
    raise ConfigError(f'gendd.token_dim={g.token_dim} does not divide the '
                      f'teacher feature width {t_dim}')
  model = distill.GenDDModel(backbone, t_dim, g.token_dim, g.width, g.depth,
                             remat=g.remat, rngs=nnx.Rngs(config.seed + 1))
  precision.set_compute_dtype(model, dtypes['head'])
  precision.set_compute_dtype(model.backbone, dtypes['student'])
  return model


# ---------------------------------------------------------------------------
# Losses: `(s, model, teacher, batch, key) -> (loss, metrics)`.
# ---------------------------------------------------------------------------


def _ce_loss(s, model, teacher, batch, key):
  del s, teacher, key
  _, logits = precision.to_float32(model(batch['image'], train=True))
  return gendd.cross_entropy(logits, batch['label'],
                             batch.get('label_mask')), {}


def _kl_loss(s, model, teacher, batch, key):
  del key
  _, logits = precision.to_float32(model(batch['image'], train=True))
  _, t_logits = teacher.outputs(batch['image'], batch)
  kl = gendd.distill_kl(logits, t_logits, s.kd_temperature)
  metrics = {'kl': kl}
  loss = s.kd_weight * kl
  if 'label' in batch:  # Hinton KD; the unsupervised KL sees no labels.
    ce = gendd.cross_entropy(logits, batch['label'], batch.get('label_mask'))
    metrics['ce'] = ce
    loss = loss + s.ce_weight * ce
  return loss, metrics


def _stage1_loss(s, model, teacher, batch, key):
  del s, key
  w, b = teacher.classifier()
  logits = precision.to_float32(model(batch['image'], w, b, train=True))
  return gendd.cross_entropy(logits, batch['label'],
                             batch.get('label_mask')), {}


def _gendd_loss(s, model, teacher, batch, key):
  image, labels = batch['image'], batch.get('label')
  mask = batch.get('label_mask')
  t_feat, _ = teacher.outputs(image, batch)
  w, _ = teacher.classifier()
  target = gendd.contract_target(t_feat, labels, w, s.smooth, mask)
  if teacher.target_stats is not None:
    stats = teacher.target_stats
    target = (target - stats['mean']) / stats['std']
  z, probe_logits, _ = precision.to_float32(model.student(image, train=True))
  k_mix, k_diff = jax.random.split(key)
  draws = batch.get('draws')  # Recorded draws, replayed (`train._grads`).
  z, target = gendd.mix_features(k_mix, z, target, s.beta, draws)
  schedule = diffusion.create_schedule(s.noise_schedule, s.diffusion_steps,
                                       '')
  loss, aux = gendd.diffusion_loss(model.head, schedule, k_diff, z, target,
                                   s.loss, draws)
  metrics = dict(diffusion=loss, mse=aux['mse'], vb=aux['vb'])
  if labels is not None:
    probe = gendd.cross_entropy(probe_logits, labels, mask)
    metrics['probe_ce'] = probe
    loss = loss + probe
  return loss, metrics


# ---------------------------------------------------------------------------
# Predictions: `(s, model, teacher, image, key) -> (logits, diagnostics)`.
# ---------------------------------------------------------------------------


def _classifier_logits(s, model, teacher, image, key):
  del s, teacher, key
  return {'acc': model(image)[1]}, {}


def _stage1_logits(s, model, teacher, image, key):
  del s, key
  w, b = teacher.classifier()
  return {'acc': model(image, w, b)}, {}


def _sampled_logits(s, model, teacher, image, key):
  """The configured sampler's logits (and, when asked for, the x0-clipped
  sampler's and the paper's unclipped one's), with the ratio of sample to
  teacher-feature norms."""
  z, probe_logits, _ = precision.to_float32(model.student(image))
  w, b = teacher.classifier()
  # A dynamic threshold is relative to the training targets' range.
  sample = s.sample._replace(
      clip_x0=gendd.with_bound(s.sample.clip_x0, teacher.clip_bound))
  variants = {'sampled_acc': sample}
  if s.clip_to_data or s.also_clipped:
    clipped = s.sample._replace(clip_x0=teacher.clip_bound)
    variants['sampled_acc' if s.clip_to_data else 'sampled_clip_acc'] = clipped
  if s.also_published:  # The paper's sampler, on the same head and noise.
    variants['sampled_published_acc'] = s.sample._replace(
        clip_x0=None, sampler='ancestral', temperature=1.0,
        init_temperature=1.0, cfg_scale=s.published_cfg_scale)
  t_feat, _ = teacher.outputs(image)
  t_norm = jnp.linalg.norm(t_feat, axis=-1) + 1e-12
  out, diag = {}, {}
  for name, settings in variants.items():
    steps = (s.published_steps if name == 'sampled_published_acc' else
             s.sampling_steps)
    schedule = gendd.sampling_schedule(s.noise_schedule, s.diffusion_steps,
                                       steps, settings.sampler)
    # The same key: every variant starts from the same noise.
    out[name], feat = gendd.sampled_logits(
        model.head, schedule, key, z, settings, w, b, teacher.target_stats)
    # Error amplification shows up as ratios >> 1.
    diag[name.replace('_acc', '_norm_ratio')] = (
        jnp.linalg.norm(feat, axis=-1) / t_norm)
  if s.probe:
    out['probe_acc'] = probe_logits
  return out, diag


def eval_key(seed: int, index) -> jax.Array:
  """The sampling noise key of evaluation batch `index` (training-time and
  standalone evaluation draw the same noise)."""
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), 1 << 30), index)


# ---------------------------------------------------------------------------
# The records.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one stage sees, builds, optimises and predicts.

  Attributes:
    name: the `config.stage` value.
    labels: 'all', 'subset' (the student's labelled subset, with
      `label_mask`) or 'none' (no label array reaches the device).
    needs_teacher: it loads the frozen teacher export.
    role: the config block its backbone comes from ('teacher'/'student').
    generative: it trains a diffusion head (sampled predictions).
    has_probe: it trains the linear probe on the detached student feature.
    contracts: distribution contraction applies (`gendd.smooth`).
    reads_precomputed: it can take teacher outputs precomputed on disk.
    reads_logits: its loss reads the teacher's logits.
    classifies_with_teacher: its predictions go through the frozen teacher
      classifier (exported with it).
    warm_start: the earlier stage whose export initialises its backbone,
      when a pipeline runs that stage first.
    build: `(config, info, dtypes, role) -> module` with fresh weights.
    loss: `(s, model, teacher, batch, key) -> (loss, metrics)`.
    predict: `(s, model, teacher, image, key) -> (logits, diagnostics)`.
  """
  name: str
  labels: str
  needs_teacher: bool
  role: str
  build: Callable[..., nnx.Module]
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  predict: Callable[..., tuple[Logits, dict[str, jax.Array]]]
  generative: bool = False
  has_probe: bool = False
  contracts: bool = False
  reads_precomputed: bool = False
  reads_logits: bool = False
  classifies_with_teacher: bool = False
  warm_start: str | None = None

  def visible(self, batch: dict[str, Any]) -> dict[str, Any]:
    """The part of a host batch this stage may see (labels stripped)."""
    keep = {'none': ('image',), 'all': ('image', 'label'),
            'subset': ('image', 'label', 'label_mask')}[self.labels]
    keep += ('teacher_feature', 'teacher_logits')
    return {k: batch[k] for k in keep if k in batch}

  def create_model(self, config, info) -> nnx.Module:
    """The trainable module with freshly initialised weights."""
    return self.build(config, info, precision.compute_dtypes(config),
                      self.role)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage('teacher', 'all', False, 'teacher', _build_classifier, _ce_loss,
          _classifier_logits),
    Stage('scratch', 'subset', False, 'student', _build_classifier, _ce_loss,
          _classifier_logits),
    Stage('kd', 'subset', True, 'student', _build_classifier, _kl_loss,
          _classifier_logits, reads_precomputed=True, reads_logits=True),
    Stage('kl', 'none', True, 'student', _build_classifier, _kl_loss,
          _classifier_logits, reads_precomputed=True, reads_logits=True),
    Stage('stage1', 'subset', True, 'student', _build_stage1, _stage1_loss,
          _stage1_logits, classifies_with_teacher=True),
    Stage('gendd', 'subset', True, 'student', _build_gendd, _gendd_loss,
          _sampled_logits, generative=True, has_probe=True, contracts=True,
          reads_precomputed=True, warm_start='stage1',
          classifies_with_teacher=True),
    Stage('gendd_unsup', 'none', True, 'student', _build_gendd, _gendd_loss,
          _sampled_logits, generative=True, reads_precomputed=True,
          classifies_with_teacher=True),
)}


def get(name: str) -> Stage:
  """The record of stage `name`; a ConfigError naming the choices else."""
  if name not in STAGES:
    raise ConfigError(f'unknown stage {name!r}; expected one of '
                      f'{", ".join(STAGES)} (or "pipeline" in configs that '
                      'define one)')
  return STAGES[name]


def abstract_model(meta: dict[str, Any],
                   config: ml_collections.ConfigDict | None = None):
  """The shapes of the model a checkpoint or export describes.

  Args:
    meta: its metadata (`config`, `stage`, `num_classes`, `input_shape`).
    config: overrides the stored config.

  Returns:
    `(config, stage, info, graphdef, params, batch_stats)`, the last two
    trees of `jax.ShapeDtypeStruct` (nothing is allocated).
  """
  if config is None:
    config = ml_collections.ConfigDict(meta['config'])
  stage = meta['stage']
  info = dict(num_classes=meta['num_classes'],
              input_shape=tuple(meta['input_shape']))
  module = nnx.eval_shape(lambda: get(stage).create_model(config, info))
  graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  return config, stage, info, graphdef, params, batch_stats
