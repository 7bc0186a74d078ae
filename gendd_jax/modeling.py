"""Building the models of every stage from a config (no training code).

Shared by training (`train`), export and the standalone evaluation
(`evaluate`), so an exported model is rebuilt exactly as it was trained.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gendd_jax import models
from gendd_jax import precision
from gendd_jax.models import distill
from gendd_jax.errors import ConfigError


def create_backbone(cfg: ml_collections.ConfigDict, info, seed: int):
  """The backbone named by a `teacher`/`student` config block."""
  kwargs = {k: v for k, v in cfg.items()
            if k not in ('model', 'checkpoint', 'init_from', 'source',
                         'features')}
  return models.create_backbone(
      cfg.model, num_classes=info['num_classes'],
      input_shape=info['input_shape'], rngs=nnx.Rngs(seed), **kwargs)


def teacher_feature_dim(config, info) -> int:
  m = nnx.eval_shape(lambda: create_backbone(config.teacher, info, 0))
  return m.feature_dim


def create_model(config, info, stage: str) -> nnx.Module:
  """The trainable module of `stage` with freshly initialised weights."""
  role = config.teacher if stage == 'teacher' else config.student
  backbone = create_backbone(role, info, config.seed)
  dtypes = compute_dtypes(config)
  if stage in ('teacher', 'scratch', 'kd', 'kl'):
    return precision.set_compute_dtype(
        backbone, dtypes['teacher' if stage == 'teacher' else 'student'])
  t_dim = teacher_feature_dim(config, info)
  rngs = nnx.Rngs(config.seed + 1)
  if stage == 'stage1':
    return precision.set_compute_dtype(
        distill.Stage1Model(backbone, t_dim, rngs=rngs), dtypes['student'])
  g = config.gendd
  if t_dim % g.token_dim:
    raise ConfigError(f'gendd.token_dim={g.token_dim} does not divide the '
                      f'teacher feature width {t_dim}')
  model = distill.GenDDModel(backbone, t_dim, g.token_dim, g.width, g.depth,
                             remat=g.remat, rngs=rngs)
  precision.set_compute_dtype(model, dtypes['head'])
  precision.set_compute_dtype(model.backbone, dtypes['student'])
  return model


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
  module = nnx.eval_shape(lambda: create_model(config, info, stage))
  graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  return config, stage, info, graphdef, params, batch_stats


def compute_dtypes(config) -> dict[str, str]:
  """`config.precision`'s compute dtype per role (float32 where unset),
  validated."""
  p = config.get('precision') or {}  # No block: float32 everywhere.
  out = {role: p.get(role, 'float32') for role in ('student', 'teacher',
                                                    'head')}
  for role, name in out.items():
    try:
      precision.compute_dtype(name)
    except ValueError as e:
      raise ConfigError(f'precision.{role}: {e}') from None
  return out


def classifier(params: Any) -> tuple[jax.Array, jax.Array]:
  """`(W [C, D], b [C])` of a backbone's final linear layer `fc`."""
  fc = params['fc']
  return jnp.transpose(fc['kernel'][...]), fc['bias'][...]
