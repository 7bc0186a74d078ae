r"""Estimated training time of the paper's configs: `docs/walltime.md`, and
the line in each config's docstring.

  python -m tools.walltime           # traces every stage (minutes), writes
                                     # docs/walltime.{json,md}
  python -m tools.walltime --check   # no tracing: the docstrings and the
                                     # table agree with the configs' schedules
  python -m tools.walltime --render  # the table again from the recorded
                                     # FLOPs (no tracing)

The FLOPs of one training step per example come from the traced step
(`flops.matmul_flops`: teacher forward, student and head forward and
backward) and are recorded in `docs/walltime.json`; steps come from each
config's epochs, batch and training-set size (`config_lib.TRAIN_EXAMPLES`);
time is `gendd_jax.walltime.seconds` on the named accelerators. Estimates,
not measurements (no such run fits this project's machines).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from gendd_jax import config_lib
from gendd_jax import flops
from gendd_jax import optim
from gendd_jax import precision
from gendd_jax import settings
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
from gendd_jax import train
from gendd_jax import walltime
from tools import recipes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(_ROOT, 'docs', 'walltime.json')
MD = os.path.join(_ROOT, 'docs', 'walltime.md')
# The accelerators every estimate names: one GPU (the released CIFAR runs),
# the released ImageNet runs' 8-GPU node, and a TPU v4-32 slice.
TARGETS = (('NVIDIA A100', 1), ('NVIDIA A100', 8), ('TPU v4', 16))
# Config argument -> training set (`config_lib.TRAIN_EXAMPLES`).
CONFIGS = {
    'r18_from_r34': 'imagenet2012',
    'mbv1_from_r50': 'imagenet2012',
    'r50_600ep': 'imagenet2012',
    'r50_from_beitv2l': 'imagenet2012',
    'r50_from_beitv2b': 'imagenet2012',
    'imagenet_lt:r50': 'imagenet_lt',
    'imagenet_lt:r18': 'imagenet_lt',
    'imagenet_lt:teacher': 'imagenet_lt',
    'cc3m_unsup:r18': 'cc3m',
    'cc3m_unsup:mbv1': 'cc3m',
    'cc3m_unsup:mbv1_kl': 'cc3m',
    'cifar100_gendd:resnet32x4-resnet8x4': 'cifar100',
    'cifar100_teacher:resnet32x4': 'cifar100',
}
LINE = re.compile(r'Estimated\s+training\s+time\s+\(not\s+measured;\s+'
                  r'docs/walltime\.md\):\s+(.+?)\.\n', re.S)


def _info(dataset: str) -> dict[str, Any]:
  if dataset == 'cifar100':
    return dict(num_classes=100, input_shape=(32, 32, 3))
  return dict(num_classes=1000, input_shape=(224, 224, 3))


def stage_names(config) -> tuple[str, ...]:
  return (tuple(config.pipeline.stages) if config.stage == 'pipeline'
          else (config.stage,))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def step_flops_per_example(config, stage: str, info: dict[str, Any]) -> int:
  """FLOPs of one training step per example of the global batch (the step
  traced on one example; nothing is allocated or run)."""
  record = stages.get(stage)
  module = nnx.eval_shape(lambda: record.create_model(config, info))
  s = settings.step_settings(config, stage, steps_per_epoch=1000)
  graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  state = train.TrainState(
      graphdef=graphdef, step=jax.ShapeDtypeStruct((), jnp.int32),
      params=params, batch_stats=stats,
      opt_state=jax.eval_shape(optim.create_optimizer(s.optim).init, params))
  teacher = teacher_lib.Teacher()
  if record.needs_teacher:
    t_module = precision.set_compute_dtype(
        nnx.eval_shape(lambda: stages.create_backbone(config.teacher, info,
                                                      0)),
        precision.compute_dtypes(config)['teacher'])
    t_graph, t_params, t_stats = nnx.split(t_module, nnx.Param, nnx.BatchStat)
    teacher = teacher_lib.Teacher(
        variables=dict(params=t_params, batch_stats=t_stats),
        graphdef=t_graph)
  batch = {'image': jax.ShapeDtypeStruct((1,) + tuple(info['input_shape']),
                                         jnp.float32)}
  if record.labels != 'none':
    soft = any(config.data.get(k, 0) > 0
               for k in ('mixup', 'cutmix', 'label_smoothing'))
    batch['label'] = (
        jax.ShapeDtypeStruct((1, info['num_classes']), jnp.float32) if soft
        else jax.ShapeDtypeStruct((1,), jnp.int32))
  jaxpr = jax.make_jaxpr(functools.partial(train.train_step, s))(
      _abstract(state), teacher, batch)
  return flops.matmul_flops(jaxpr)


def schedule(arg: str) -> dict[str, int]:
  """Stage -> optimizer steps of config `arg`."""
  config = recipes.load_config(arg)
  n = config_lib.TRAIN_EXAMPLES[CONFIGS[arg]]
  spe = n // config.data.batch_size
  return {st: settings.optim_spec(config, st, spe).total_steps
          for st in stage_names(config)}


def estimate(arg: str, per_example: dict[str, int]) -> dict[str, Any]:
  """Steps, FLOPs and the estimated time on each of `TARGETS`."""
  config = recipes.load_config(arg)
  steps = schedule(arg)
  total = sum(per_example[st] * config.data.batch_size * n
              for st, n in steps.items())
  times = {f'{chips} x {kind}': walltime.seconds(total, kind, chips)
           for kind, chips in TARGETS}
  return dict(steps=steps, flops=total, seconds=times)


def sentence(est: dict[str, Any]) -> str:
  """The docstring's words for an estimate."""
  parts = []
  for where, secs in est['seconds'].items():
    parts.append(f'{walltime.amount(secs)} on {where}')
  return ', '.join(parts)


def config_file(arg: str) -> str:
  return os.path.join(_ROOT, 'configs', arg.split(':')[0] + '.py')


def docstring_claims(arg: str) -> list[str]:
  """Every estimate sentence in the docstring of `arg`'s config file, as
  `variant: words` lines (see `render_docstring_line`)."""
  with open(config_file(arg)) as f:
    text = f.read()
  return [' '.join(m.split()) for m in LINE.findall(text)]


def expected_claim(arg: str, est: dict[str, Any]) -> str:
  variant = arg.split(':', 1)[1] if ':' in arg else ''
  prefix = f'{variant}: ' if variant else ''
  return prefix + sentence(est)


def render(table: dict[str, Any]) -> str:
  lines = [
      '# Estimated training time of the paper configs',
      '',
      'Generated by `python -m tools.walltime` (checked by '
      '`tests/test_walltime.py`); estimates, not measurements. FLOPs per '
      'example are those of the traced training step (teacher forward, '
      'student and head forward and backward: `gendd_jax.flops`), for each '
      'stage of the config; steps follow from its epochs, batch and '
      'training-set size; time assumes '
      f'{walltime.UTILISATION:.0%} of the dense bfloat16 peak '
      '(`gendd_jax/walltime.py`). Data loading, evaluation, checkpoints and '
      'compilation are not counted, and the utilisation is an assumption: '
      'small-batch runs (CIFAR, 64 images per step) are usually bound by '
      'per-step overheads and can take several times longer. A run prints '
      'the same estimate for its own devices after its first step, and a '
      'measured one after ten more.',
      '',
      '| config | stage: GFLOP per example x steps | total PFLOP | '
      + ' | '.join(f'{c} x {k}' for k, c in TARGETS) + ' |',
      '|---|---|---|' + '---|' * len(TARGETS),
  ]
  for arg, entry in table.items():
    est = estimate(arg, entry['flops_per_example'])
    stages_txt = '; '.join(
        f'{st}: {entry["flops_per_example"][st] / 1e9:.1f} x {n:,}'
        for st, n in est['steps'].items())
    times = ' | '.join(walltime.amount(s) for s in est['seconds'].values())
    lines.append(f'| `{arg}` | {stages_txt} | {est["flops"] / 1e15:,.0f} | '
                 f'{times} |')
  return '\n'.join(lines) + '\n'


def problems(table: dict[str, Any]) -> list[str]:
  """What `--check` (and the test) fail on."""
  out = []
  if sorted(table) != sorted(CONFIGS):
    out.append(f'docs/walltime.json covers {sorted(table)}, expected '
               f'{sorted(CONFIGS)}')
    return out
  for arg, entry in table.items():
    steps = schedule(arg)
    if sorted(steps) != sorted(entry['flops_per_example']):
      out.append(f'{arg}: stages {sorted(steps)} but FLOPs recorded for '
                 f'{sorted(entry["flops_per_example"])}; rerun the tool')
      continue
    want = expected_claim(arg, estimate(arg, entry['flops_per_example']))
    if want not in docstring_claims(arg):
      out.append(f'{config_file(arg)}: the docstring should say '
                 f'"Estimated training time (not measured; '
                 f'docs/walltime.md): {want}." (found: '
                 f'{docstring_claims(arg)})')
  with open(MD) as f:
    if f.read() != render(table):
      out.append('docs/walltime.md is stale; run python -m tools.walltime')
  return out


def load_table() -> dict[str, Any]:
  with open(JSON) as f:
    return json.load(f)


def main(argv):
  del argv
  if flags.FLAGS.render:  # Only the table, from the recorded FLOPs.
    with open(MD, 'w') as f:
      f.write(render(load_table()))
    for arg, entry in load_table().items():
      print(f'{arg}: ' + expected_claim(
          arg, estimate(arg, entry['flops_per_example'])))
    return 0
  if flags.FLAGS.check:
    bad = problems(load_table())
    for p in bad:
      print(p, file=sys.stderr)
    return 1 if bad else 0
  table = {}
  for arg, dataset in CONFIGS.items():
    config = recipes.load_config(arg)
    per = {st: step_flops_per_example(config, st, _info(dataset))
           for st in stage_names(config)}
    table[arg] = dict(flops_per_example=per)
    print(f'{arg}: ' + expected_claim(arg, estimate(arg, per)), flush=True)
  with open(JSON, 'w') as f:
    json.dump(table, f, indent=1)
  with open(MD, 'w') as f:
    f.write(render(table))
  return 0


if __name__ == '__main__':
  flags.DEFINE_bool('check', False, 'Check instead of tracing and writing.')
  flags.DEFINE_bool('render', False, 'Rewrite docs/walltime.md from the '
                    'recorded FLOPs (no tracing).')
  app.run(main)
