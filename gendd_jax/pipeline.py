"""Multi-stage runs: a plain sequence of stages, or the k-fold protocol.

`pipeline.protocol = 'sequence'` (the ImageNet and CIFAR configs): the
stages of `pipeline.stages` run in order, each in `workdir/<stage>`; a
'teacher' stage's export becomes the teacher of later stages (else
`config.teacher.checkpoint` is used) and stage-1's export initialises the
GenDD student. Run the same command again to resume: finished stages are
skipped and an interrupted one resumes from its checkpoint.

`pipeline.protocol = 'kfold'` (the bundled example): the k-fold x seeds
distillation protocol and its results table, described below.

For each seed and each fold it runs the configured stages in order (teacher,
few-label scratch student, KD, stage-1, GenDD, KL, unsupervised GenDD), each in
its own work directory `workdir/seed{s}/fold{f}/{stage}`, wiring the teacher's
export and the stage-1 export into the stages that need them. Finished stages
are skipped when the command is run again, so an interrupted pipeline resumes.

Each seed's folds together test every image once; a method's accuracy for a
seed is computed over all images, and the table reports the mean and standard
deviation over seeds plus paired differences between methods.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import numpy as np

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import paths
from gendd_jax import reliability
from gendd_jax import stages as stages_lib
from gendd_jax import train
from gendd_jax.errors import ConfigError

# Table rows: (key, label, stage, prediction name). 'sampled' is the
# configured sampler; 'as published' the paper's (ancestral, no clipping),
# measured beside a clipping default; 'x0 clipped' beside the paper's.
METHODS = (
    ('teacher', 'Teacher (all labels)', 'teacher', 'acc'),
    ('scratch', 'Student from scratch (labelled subset)', 'scratch', 'acc'),
    ('kd', 'Hinton KD', 'kd', 'acc'),
    ('stage1', 'Stage-1 warm-up', 'stage1', 'acc'),
    ('gendd', 'GenDD (sampled)', 'gendd', 'sampled_acc'),
    ('gendd_published', 'GenDD (sampled, as published)', 'gendd',
     'sampled_published_acc'),
    ('gendd_clip', 'GenDD (sampled, x0 clipped)', 'gendd',
     'sampled_clip_acc'),
    ('gendd_probe', 'GenDD (probe)', 'gendd', 'probe_acc'),
    ('kl', 'Unsupervised KL', 'kl', 'acc'),
    ('gendd_unsup', 'Unsupervised GenDD (sampled)', 'gendd_unsup',
     'sampled_acc'),
    ('gendd_unsup_published', 'Unsupervised GenDD (sampled, as published)',
     'gendd_unsup', 'sampled_published_acc'),
    ('gendd_unsup_clip', 'Unsupervised GenDD (sampled, x0 clipped)',
     'gendd_unsup', 'sampled_clip_acc'),
)
# Paired comparisons reported under the table: (a, b) means a - b.
PAIRS = (('gendd', 'kd'), ('gendd_clip', 'kd'), ('gendd_probe', 'kd'),
         ('gendd_unsup', 'kl'), ('gendd_unsup_clip', 'kl'),
         ('gendd', 'gendd_published'), ('gendd_clip', 'gendd'),
         ('gendd_unsup', 'gendd_unsup_published'), ('kd', 'scratch'),
         ('gendd', 'scratch'), ('gendd_clip', 'scratch'))


def stage_config(config, stage: str, seed: int, fold: int, unit_dir: str):
  """The single-stage config of `stage` inside one (seed, fold) unit."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.stage = stage
    c.seed = int(seed)
    c.data.fold = int(fold)
    if stages_lib.get(stage).needs_teacher:
      c.teacher.checkpoint = os.path.join(unit_dir, 'teacher', 'export')
    c.student.init_from = ''
    src = stages_lib.get(stage).warm_start
    if src and src in config.pipeline.stages:
      c.student.init_from = os.path.join(unit_dir, src, 'export')
  return c


def _distils(stages: tuple[str, ...]) -> bool:
  return any(stages_lib.get(s).needs_teacher for s in stages)


def run(config, workdir: str) -> dict[str, Any]:
  """Runs `config.pipeline` (see the module docstring)."""
  protocol = config.pipeline.get('protocol', 'kfold')
  if protocol == 'sequence':
    return run_sequence(config, workdir)
  if protocol != 'kfold':
    raise ConfigError(f"pipeline.protocol={protocol!r}; expected "
                            "'sequence' or 'kfold'")
  return run_kfold(config, workdir)


def sequence_stage_config(config, stage: str, workdir: str):
  """The single-stage config of `stage` in a sequence run."""
  stages = tuple(config.pipeline.stages)
  c = copy.deepcopy(config)
  with c.unlocked():
    c.stage = stage
    record = stages_lib.get(stage)
    if record.needs_teacher and 'teacher' in stages:
      c.teacher.checkpoint = os.path.join(workdir, 'teacher', 'export')
    src = record.warm_start
    if src in stages and stages.index(src) < stages.index(stage):
      c.student.init_from = os.path.join(workdir, src, 'export')
  return c


def run_sequence(config, workdir: str) -> dict[str, Any]:
  """Runs `config.pipeline.stages` in order; writes `results.json`."""
  stages = tuple(config.pipeline.stages)
  if not stages:
    raise ConfigError('pipeline.stages is empty')
  for s in stages:
    if s not in stages_lib.STAGES:
      raise ConfigError(f'unknown stage {s!r} in pipeline.stages; '
                        f'expected some of {", ".join(stages_lib.STAGES)}')
    if s not in config.stages:
      raise ConfigError(f'pipeline stage {s!r} has no optimiser '
                        f'settings (config.stages.{s})')
  if (_distils(stages) and 'teacher' not in stages and
      not config.teacher.checkpoint and
      config.teacher.get('source', 'model') != 'random'):
    raise ConfigError(
        'this run distils from a teacher: set --config.teacher.checkpoint='
        '<export dir> (python -m gendd_jax.cli.convert makes one from a '
        'PyTorch checkpoint)')
  reliability.check_workdir(workdir)
  t_start = time.time()
  summary = {}
  for i, stage in enumerate(stages):
    run_dir = os.path.join(workdir, stage)
    res_path = os.path.join(run_dir, 'results.json')
    if paths.exists(res_path):
      res = json.loads(paths.read_text(res_path))
      note = 'done earlier'
    else:
      print(f'== stage {i + 1}/{len(stages)}: {stage} -> {run_dir}',
            flush=True)
      res = train.train_and_evaluate(
          sequence_stage_config(config, stage, workdir), run_dir)
      note = f'{res["train_seconds"] + res["eval_seconds"]:.0f}s'
    summary[stage] = dict(accuracy=res['accuracy'], steps=res['steps'])
    accs = ', '.join(f'{k} {v:.2f}%' for k, v in res['accuracy'].items())
    print(f'== {stage}: {accs} ({note})', flush=True)
  out = dict(protocol='sequence', stages=summary,
             wall_seconds=time.time() - t_start)
  ckpt_lib.publish({os.path.join(workdir, 'results.json'):
                    json.dumps(out, indent=1)}, 'sequence')
  return out


def run_kfold(config, workdir: str) -> dict[str, Any]:
  """Runs the k-fold protocol and writes `results.json` and `results.md`."""
  stages = tuple(config.pipeline.stages)
  for s in stages:
    if s not in stages_lib.STAGES:
      raise ConfigError(f'unknown stage {s!r} in pipeline.stages')
  if _distils(stages) and 'teacher' not in stages:
    raise ConfigError("pipeline.stages needs 'teacher' before the "
                      'stages that distil from it')
  reliability.check_workdir(workdir)
  seeds = tuple(int(s) for s in config.pipeline.seeds)
  folds = int(config.data.num_folds)
  total = len(seeds) * folds * len(stages)
  done = 0
  t_start = time.time()
  per_run: dict[tuple[int, int, str], dict[str, Any]] = {}
  print(f'GenDD pipeline: {len(seeds)} seed(s) x {folds} folds x '
        f'{len(stages)} stages -> {workdir}', flush=True)
  for seed in seeds:
    for fold in range(folds):
      unit_dir = os.path.join(workdir, f'seed{seed}', f'fold{fold}')
      for stage in stages:
        run_dir = os.path.join(unit_dir, stage)
        res_path = os.path.join(run_dir, 'results.json')
        t0 = time.time()
        if paths.exists(res_path):
          res = json.loads(paths.read_text(res_path))
          note = 'done earlier'
        else:
          cfg = stage_config(config, stage, seed, fold, unit_dir)
          res = train.train_and_evaluate(cfg, run_dir, quiet=True)
          note = f'{time.time() - t0:.1f}s'
        per_run[(seed, fold, stage)] = res
        done += 1
        accs = ' '.join(f'{k}={v:.1f}' for k, v in res['accuracy'].items())
        elapsed = time.time() - t_start
        print(f'[{done:3d}/{total}] seed {seed} fold {fold + 1}/{folds} '
              f'{stage:<11s} {accs:<34s} ({note}, elapsed {elapsed:.0f}s)',
              flush=True)
  summary = summarise(per_run, seeds, folds, stages)
  summary['wall_seconds'] = time.time() - t_start
  summary['settings'] = dict(
      label_fraction=config.data.label_fraction, num_folds=folds,
      seeds=list(seeds), sampler=config.sampler.to_dict(),
      gendd=config.gendd.to_dict())
  table = markdown_table(summary)
  ckpt_lib.publish({os.path.join(workdir, 'results.json'):
                    json.dumps(summary, indent=1),
                    os.path.join(workdir, 'results.md'): table},
                   'kfold')
  print('\n' + table, flush=True)
  return summary


def _pooled(per_run, seed, folds, stage, pred):
  """Per-image correctness of one method over all folds of one seed."""
  correct = []
  for fold in range(folds):
    r = per_run[(seed, fold, stage)]
    if pred not in r['predictions']:
      return None
    p = np.asarray(r['predictions'][pred])
    correct.append(p == np.asarray(r['labels']))
  return np.concatenate(correct)


def summarise(per_run, seeds, folds, stages) -> dict[str, Any]:
  """Accuracy per method (mean/std over seeds) and paired differences."""
  methods = {}
  correct = {}
  for key, label, stage, pred in METHODS:
    if stage not in stages:
      continue
    per_seed = []
    for seed in seeds:
      c = _pooled(per_run, seed, folds, stage, pred)
      if c is None:
        break
      correct[(key, seed)] = c
      per_seed.append(float(c.mean() * 100.0))
    if len(per_seed) != len(seeds):
      continue
    fold_accs = [per_run[(s, f, stage)]['accuracy'][pred]
                 for s in seeds for f in range(folds)]
    diag_key = pred.replace('_acc', '_norm_ratio')
    ratios = [per_run[(s, f, stage)].get('diagnostics', {}).get(diag_key)
              for s in seeds for f in range(folds)]
    methods[key] = dict(label=label, per_seed=per_seed,
                        mean=float(np.mean(per_seed)),
                        std=float(np.std(per_seed)),
                        fold_std=float(np.std(fold_accs)),
                        num_images=int(len(correct[(key, seeds[0])])),
                        norm_ratio=(float(np.mean(ratios))
                                    if None not in ratios else None))
  pairs = []
  for a, b in PAIRS:
    if a not in methods or b not in methods:
      continue
    diffs = [methods[a]['per_seed'][i] - methods[b]['per_seed'][i]
             for i in range(len(seeds))]
    a_only = sum(int(np.sum(correct[(a, s)] & ~correct[(b, s)]))
                 for s in seeds)
    b_only = sum(int(np.sum(~correct[(a, s)] & correct[(b, s)]))
                 for s in seeds)
    pairs.append(dict(a=a, b=b, per_seed=diffs, mean=float(np.mean(diffs)),
                      std=float(np.std(diffs)), a_only=a_only, b_only=b_only))
  return dict(methods=methods, pairs=pairs)


def markdown_table(summary: dict[str, Any]) -> str:
  m = summary['methods']
  seeds = len(next(iter(m.values()))['per_seed']) if m else 0
  lines = [f'| method | top-1 % (mean ± std over {seeds} seed(s)) | '
           'per seed | std over folds | ‖sample‖ / ‖teacher feature‖ |',
           '|---|---|---|---|---|']
  for v in m.values():
    per = ', '.join(f'{x:.2f}' for x in v['per_seed'])
    ratio = '—' if v.get('norm_ratio') is None else f"{v['norm_ratio']:.2f}"
    lines.append(f"| {v['label']} | {v['mean']:.2f} ± {v['std']:.2f} | "
                 f"{per} | {v['fold_std']:.2f} | {ratio} |")
  if not summary['pairs']:
    return '\n'.join(lines) + '\n'
  lines += ['', '| paired difference | mean ± std (points) | per seed | '
            'images only A right / only B right |', '|---|---|---|---|']
  for p in summary['pairs']:
    per = ', '.join(f'{x:+.2f}' for x in p['per_seed'])
    lines.append(f"| {m[p['a']]['label']} − {m[p['b']]['label']} | "
                 f"{p['mean']:+.2f} ± {p['std']:.2f} | {per} | "
                 f"{p['a_only']} / {p['b_only']} |")
  return '\n'.join(lines) + '\n'
