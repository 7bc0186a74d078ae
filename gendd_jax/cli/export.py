r"""Export a training run at any checkpoint: only what inference needs.

  python -m gendd_jax.cli.export --workdir=runs/r50_600ep/gendd \
      --out=exports/r50

Reads the latest checkpoint of `<workdir>/checkpoints` (or `--step`; or the
run's final `<workdir>/export` when it kept no checkpoints) and writes, in
the one export format every run's final export also has
(`checkpoint.save_export`), an orbax checkpoint at `--out` holding the
student (parameters and batch statistics: backbone, linear probe,
condition LayerNorm and diffusion head), the frozen teacher classifier
`W_cls`/`b_cls` that classifies generated features, the target statistics
if the head was trained on standardised targets, and the config.
`python -m gendd_jax.cli.evaluate` loads it without the training code.
Works for every stage: backbone stages export the classifier network alone,
stage-1 its projection plus `W_cls`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
from absl import logging
import jax.numpy as jnp

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import paths
from gendd_jax import errors
from gendd_jax import settings
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
from gendd_jax import train
from gendd_jax.cli import common

_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the '
                             'latest).')
flags.declare_key_flag('workdir')
flags.declare_key_flag('out')


def _source(workdir: str, step: int | None) -> tuple[str, int | None]:
  """('checkpoint', step) or ('export', None): where the weights come
  from."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if paths.isdir(ckpt_dir):
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
      steps = ckpt.all_steps()
    finally:
      ckpt.close()
    if step is not None:
      if step not in steps:
        raise ckpt_lib.CheckpointError(
            f'no checkpoint for step {step} in {ckpt_dir} (have '
            f'{", ".join(map(str, steps)) or "none"})')
      return 'checkpoint', step
    if steps:
      return 'checkpoint', max(steps)
  if step is None and paths.exists(os.path.join(workdir, 'export',
                                                   'meta.json')):
    return 'export', None
  raise ckpt_lib.CheckpointError(f'{workdir} holds no checkpoint or final '
                                 'export (is it a training run directory?)')


def export(workdir: str, out: str, step: int | None = None
           ) -> dict[str, Any]:
  """Writes the export of `workdir` (at `step`) to `out`; returns its meta."""
  if paths.exists(out):
    raise ckpt_lib.CheckpointError(f'{out} already exists; choose a new '
                                   '--out (exports are never overwritten)')
  kind, step = _source(workdir, step)
  mesh = sharding.create_mesh(1)
  rep = sharding.replicated(mesh)
  if kind == 'export':  # The run's final export: re-labelled, not rebuilt.
    meta = ckpt_lib.load_export_meta(os.path.join(workdir, 'export'))
  else:
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 async_save=False)
    meta = ckpt.metadata(step)
  if 'config' not in meta or 'input_shape' not in meta:
    raise ckpt_lib.CheckpointError(
        f'{workdir} was written by an older version (its checkpoint has no '
        'config); re-run training to export it')
  config, stage, info, _, params, batch_stats = stages.abstract_model(meta)
  abstract = dict(params=params, batch_stats=batch_stats)
  if kind == 'export':
    tree, _ = ckpt_lib.load_export(os.path.join(workdir, 'export'),
                                   ckpt_lib.abstract_like(abstract, rep))
    model, classifier = tree['model'], tree.get('classifier')
    classifier = classifier and (classifier['weight'], classifier['bias'])
    step = meta.get('step')
  else:
    state = train.abstract_train_state(
        params, batch_stats, settings.optim_spec(config, stage, 1))
    try:
      arrays, _ = ckpt.restore(
          ckpt_lib.abstract_like(state.arrays(), rep), step)
    finally:
      ckpt.close()
    model = dict(params=arrays['params'], batch_stats=arrays['batch_stats'])
    classifier = None
    if stages.get(stage).classifies_with_teacher:
      classifier = teacher_lib.load(config, info, mesh).classifier()
  stats = meta.get('target_stats')
  out_meta = train.export_meta(config, meta, step, paths.absolute(workdir))
  ckpt_lib.save_export(
      out, model, out_meta, classifier=classifier,
      target_stats=stats and {k: jnp.asarray(v, 'float32')
                              for k, v in stats.items()})
  return out_meta


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not common.WORKDIR.value or not common.OUT.value:
    errors.fail('both --workdir and --out are required')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Keep library INFO logs out.
  meta = export(paths.absolute(common.WORKDIR.value),
                paths.absolute(common.OUT.value), _STEP.value)
  print(json.dumps({k: meta[k] for k in ('stage', 'model', 'teacher_model',
                                         'num_classes', 'step')}))
  print(f'exported to {paths.absolute(common.OUT.value)}', flush=True)


def entry() -> None:
  """The `gendd-export` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
