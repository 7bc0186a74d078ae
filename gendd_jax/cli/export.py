r"""Export a training run for evaluation: only what inference needs.

  python -m gendd_jax.cli.export --workdir=runs/r50_600ep/gendd \
      --out=exports/r50

Reads the latest checkpoint of `<workdir>/checkpoints` (or `--step`; or the
run's final `<workdir>/export` when it kept no checkpoints) and writes an
orbax checkpoint at `--out` holding the student (parameters and batch
statistics: backbone, linear probe, condition LayerNorm and diffusion head),
the frozen teacher classifier `W_cls`/`b_cls` that classifies generated
features, the target statistics if the head was trained on standardised
targets, and the config. `python -m gendd_jax.cli.evaluate` loads it without
the training code. Works for every stage: backbone stages export the
classifier network alone, stage-1 its projection plus `W_cls`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import flags
from absl import logging
import jax

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import errors
from gendd_jax import modeling
from gendd_jax import optim
from gendd_jax import sharding
from gendd_jax import train
from gendd_jax.cli import common
from gendd_jax.cli.evaluate import EXPORT_KIND

_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the '
                             'latest).')
flags.declare_key_flag('workdir')
flags.declare_key_flag('out')


def _source(workdir: str, step: int | None) -> tuple[str, int | None]:
  """('checkpoint', step) or ('export', None): where the weights come
  from."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if ckpt_lib.isdir(ckpt_dir):
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
  if step is None and ckpt_lib.exists(os.path.join(workdir, 'export',
                                                   'meta.json')):
    return 'export', None
  raise ckpt_lib.CheckpointError(f'{workdir} holds no checkpoint or final '
                                 'export (is it a training run directory?)')


def export(workdir: str, out: str, step: int | None = None
           ) -> dict[str, Any]:
  """Writes the evaluation export of `workdir` to `out`; returns its meta."""

  if ckpt_lib.exists(out):
    raise ckpt_lib.CheckpointError(f'{out} already exists; choose a new '
                                   '--out (exports are never overwritten)')
  kind, step = _source(workdir, step)
  mesh = sharding.create_mesh(1)
  rep = sharding.replicated(mesh)
  if kind == 'checkpoint':
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 async_save=False)
    meta = ckpt.metadata(step)
  else:
    meta = ckpt_lib.load_export_meta(os.path.join(workdir, 'export'))
  if 'config' not in meta or 'input_shape' not in meta:
    raise ckpt_lib.CheckpointError(
        f'{workdir} was written by an older version (its checkpoint has no '
        'config); re-run training to export it')
  config, stage, info, _, params, batch_stats = modeling.abstract_model(meta)
  if kind == 'checkpoint':
    ospec = train.optim_spec(config, stage, 1)
    opt_state = jax.eval_shape(optim.create_optimizer(ospec).init, params)
    abstract = ckpt_lib.abstract_like(dict(
        step=jax.ShapeDtypeStruct((), 'int32'), params=params,
        batch_stats=batch_stats, opt_state=opt_state), rep)
    try:
      state, _ = ckpt.restore(abstract, step)
    finally:
      ckpt.close()
  else:
    state, _ = ckpt_lib.load_export(
        os.path.join(workdir, 'export'),
        ckpt_lib.abstract_like(dict(params=params, batch_stats=batch_stats),
                               rep))
  tree = dict(model=dict(params=state['params'],
                         batch_stats=state['batch_stats']))
  if stage in train.NEEDS_TEACHER:
    _, teacher = train.load_teacher(config, info, mesh)
    w, b = modeling.classifier(teacher['params'])
    tree['classifier'] = dict(weight=w, bias=b)
  if meta.get('target_stats'):
    tree['target_stats'] = {k: jax.numpy.asarray(v, 'float32')
                            for k, v in meta['target_stats'].items()}
  role = config.teacher if stage == 'teacher' else config.student
  out_meta = dict(
      kind=EXPORT_KIND, stage=stage, model=role.model,
      teacher_model=config.teacher.model, num_classes=info['num_classes'],
      input_shape=list(info['input_shape']), step=step,
      source=ckpt_lib.absolute(workdir), clip_bound=meta.get('clip_bound'),
      config=meta['config'],
      created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  ckpt_lib.save_export(out, tree, out_meta)
  return out_meta


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not common.WORKDIR.value or not common.OUT.value:
    errors.fail('both --workdir and --out are required')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Keep library INFO logs out.
  meta = export(ckpt_lib.absolute(common.WORKDIR.value),
                ckpt_lib.absolute(common.OUT.value), _STEP.value)
  print(json.dumps({k: meta[k] for k in ('stage', 'model', 'teacher_model',
                                         'num_classes', 'step')}))
  print(f'exported to {ckpt_lib.absolute(common.OUT.value)}', flush=True)


if __name__ == '__main__':
  common.run(main)
