"""The frozen teacher: loading its export, its outputs, its classifier and
the statistics of the targets it defines; warm starts from earlier exports.

The teacher is a constant of training: it is never in the optimizer or the
checkpoints, and its outputs pass through `stop_gradient`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import precision
from gendd_jax import settings
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax.errors import ConfigError


def classifier(params: Any) -> tuple[jax.Array, jax.Array]:
  """`(W [C, D], b [C])` of a backbone's final linear layer `fc`."""
  fc = params['fc']
  return jnp.transpose(fc['kernel'][...]), fc['bias'][...]


@flax.struct.dataclass
class Teacher:
  """The frozen teacher as the jitted steps see it.

  Attributes:
    variables: `{'params', 'batch_stats'}` of the teacher backbone (None for
      stages without a teacher).
    target_stats: `{'mean', 'std'}` when the head generates standardised
      targets, else None.
    clip_bound: the training targets' largest magnitude (x0 clipping).
    graphdef: the backbone's structure (static).
    precomputed: training batches carry `teacher_feature` /
      `teacher_logits` (static).
  """
  variables: Any = None
  target_stats: Any = None
  clip_bound: Any = None
  graphdef: Any = flax.struct.field(pytree_node=False, default=None)
  precomputed: bool = flax.struct.field(pytree_node=False, default=False)

  def outputs(self, image: jax.Array, batch: dict[str, Any] | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """`(feature, logits)` in float32, precomputed or from a forward."""
    if self.precomputed and batch is not None:
      return precision.to_float32((batch.get('teacher_feature'),
                                   batch.get('teacher_logits')))
    model = nnx.merge(self.graphdef, self.variables['params'],
                      self.variables['batch_stats'])
    feat, logits = precision.to_float32(model(image, train=False))
    return jax.lax.stop_gradient(feat), jax.lax.stop_gradient(logits)

  def classifier(self) -> tuple[jax.Array, jax.Array]:
    return classifier(self.variables['params'])


def _variables(module) -> dict[str, Any]:
  _, params, bs = nnx.split(module, nnx.Param, nnx.BatchStat)
  return dict(params=params, batch_stats=bs)


# Seed of `teacher.source='random'`: the same teacher in every stage and tool.
RANDOM_TEACHER_SEED = 0


def load(config, info, mesh, precomputed: bool = False) -> Teacher:
  """The frozen teacher in `config.teacher.checkpoint`, replicated; with
  `teacher.source='random'`, the teacher architecture at its random
  initialisation (`RANDOM_TEACHER_SEED`; smoke tests, e.g. `:tiny`)."""
  if config.teacher.get('source', 'model') == 'random':
    module = precision.set_compute_dtype(
        stages.create_backbone(config.teacher, info, RANDOM_TEACHER_SEED),
        precision.compute_dtypes(config)['teacher'])
    graphdef, params, bs = nnx.split(module, nnx.Param, nnx.BatchStat)
    variables = jax.device_put(dict(params=params, batch_stats=bs),
                               sharding.replicated(mesh))
    return Teacher(variables=variables, graphdef=graphdef,
                   precomputed=precomputed)
  path = config.teacher.checkpoint
  if not path:
    raise ConfigError(f'stage {config.stage!r} needs a teacher: set '
                      '--config.teacher.checkpoint=<export dir of a teacher '
                      'run>')
  graphdef, params, bs = nnx.split(
      precision.set_compute_dtype(
          nnx.eval_shape(
              lambda: stages.create_backbone(config.teacher, info, 0)),
          precision.compute_dtypes(config)['teacher']),
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
  return Teacher(variables=tree['model'], graphdef=graphdef,
                 precomputed=precomputed)


def init_backbone(config, info, module, mesh) -> None:
  """Initialises `module.backbone` from an earlier stage's export."""
  path = config.student.init_from
  meta = ckpt_lib.load_export_meta(path)
  src = nnx.eval_shape(
      lambda: stages.get(meta.get('stage')).create_model(config, info))
  abstract = ckpt_lib.abstract_like(_variables(src), sharding.replicated(mesh))
  tree = ckpt_lib.load_export(path, abstract)[0]['model']
  bb_params = tree['params']['backbone'] if 'backbone' in tree['params'] \
      else tree['params']
  nnx.update(module.backbone, bb_params)
  if len(tree['batch_stats']):
    bs = tree['batch_stats']
    nnx.update(module.backbone, bs['backbone'] if 'backbone' in bs else bs)


def with_target_stats(config, teacher: Teacher, batches, mesh) -> Teacher:
  """`teacher` with the target statistics and the x0-clipping bound.

  With `gendd.target_norm == 'standardize'` the diffusion head generates
  `(target - mean) / std` (per dimension, over the training set's teacher
  features) and samples are mapped back before classification. The bound is
  the largest absolute value, in the head's target space, of any teacher
  feature or classifier row, so it bounds every contracted target.
  """
  norm = settings.target_norm(config)
  graphdef = teacher.graphdef

  @jax.jit
  def fwd(variables, image):  # Weights as arguments, not folded constants.
    return nnx.merge(graphdef, variables['params'],
                     variables['batch_stats'])(image)[0]

  feats = []
  for b in batches:  # This process's slice of each global batch.
    sb = sharding.shard_batch({'image': b['image'], 'valid': b['valid']},
                              mesh)  # Data-parallel, rows with their masks.
    f, valid = fwd(teacher.variables, sb['image']), sb['valid']
    if jax.process_count() > 1:  # Same statistics on every process.
      f, valid = multihost_utils.process_allgather((f, valid), tiled=True)
    feats.append(np.asarray(f)[np.asarray(valid) > 0])
  feats = np.concatenate(feats)
  w = np.asarray(teacher.classifier()[0])
  rep = sharding.replicated(mesh)
  stats = None
  if norm == 'none':
    bound = max(np.abs(feats).max(), np.abs(w).max())
  else:
    mean = feats.mean(0)
    std = feats.std(0) + 1e-3 * (feats.std() + 1e-6)
    bound = max(np.abs((feats - mean) / std).max(),
                np.abs((w - mean) / std).max())
    stats = dict(mean=jax.device_put(jnp.asarray(mean), rep),
                 std=jax.device_put(jnp.asarray(std), rep))
  return teacher.replace(
      target_stats=stats,
      clip_bound=jax.device_put(jnp.float32(float(bound)), rep))
