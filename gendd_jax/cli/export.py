r"""Export a training run for evaluation: only what inference needs.

  python -m gendd_jax.export --workdir=runs/r50_600ep/gendd --out=exports/r50

Reads the latest checkpoint of `<workdir>/checkpoints` (or `--step`; or the
run's final `<workdir>/export` when it kept no checkpoints) and writes an
orbax checkpoint at `--out` holding the student (parameters and batch
statistics: backbone, linear probe, condition LayerNorm and diffusion head),
the frozen teacher classifier `W_cls`/`b_cls` that classifies generated
features, the target statistics if the head was trained on standardised
targets, and the config. `python -m gendd_jax.evaluate` loads it without
the training code. Works for every stage: backbone stages export the
classifier network alone, stage-1 its projection plus `W_cls`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging

def define_flags() -> None:
  """Defines the command-line flags (only when run as a command, so
  importing this module next to other tools never clashes)."""
  global _WORKDIR, _OUT, _STEP
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A training run directory.')
  _OUT = flags.DEFINE_string('out', None, 'Directory to write the export to '
                             '(must not exist yet).')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the '
                               'latest).')


EXPORT_KIND = 'gendd_jax_eval'


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _source(workdir: str, step: int | None) -> tuple[str, int | None]:
  """('checkpoint', step) or ('export', None): where the weights come
  from."""
  from gendd_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
  from gendd_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from gendd_jax import modeling  # pylint: disable=g-import-not-at-top
  from gendd_jax import optim  # pylint: disable=g-import-not-at-top
  from gendd_jax import sharding  # pylint: disable=g-import-not-at-top
  from gendd_jax import train  # pylint: disable=g-import-not-at-top

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
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value or not _OUT.value:
    _fail('both --workdir and --out are required')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Keep library INFO logs out.
  from gendd_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from gendd_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    meta = export(ckpt_lib.absolute(_WORKDIR.value),
                  ckpt_lib.absolute(_OUT.value), _STEP.value)
  except errors.USER_ERRORS as e:
    _fail(str(e))
  print(json.dumps({k: meta[k] for k in ('stage', 'model', 'teacher_model',
                                         'num_classes', 'step')}))
  print(f'exported to {ckpt_lib.absolute(_OUT.value)}', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
