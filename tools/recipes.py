r"""The recipe table: every paper experiment's hyperparameters as released by
the authors (commit 9246d0b of their repository: the shell scripts, else
the argparse default that applies), beside this project's config values.

  python -m tools.recipes            # rewrites docs/recipes.md
  python -m tools.recipes --check    # exits 1 if docs/recipes.md is stale

Our values are read from the configs; the released values and their
sources are recorded below (figures, with the script or default they come
from). A row whose values differ must say why (`why`); `tests/test_recipes.py`
fails on any other difference, so a config that drifts from the release is
caught.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'recipes.md')

# Differences kept on purpose, with their reasons.
PER_STEP = ('the same schedule updated every step instead of every epoch '
            '(finer, and independent of the epoch length); '
            "`--config.stages.<stage>.lr_update=epoch` restores the "
            'reference, warm-up start and all (tests/test_step_parity.py)')
BF16 = ('bfloat16 compute for TPU throughput (parameters and optimiser '
        'state float32); `--config.precision.{student,teacher,head}=float32` '
        'restores the reference')


@dataclasses.dataclass(frozen=True)
class Row:
  """One hyperparameter: the config key (or '' for behaviour outside the
  config), the released value and its source, and, where ours differs,
  `ours` (for behaviour outside the config) and why."""
  what: str
  key: str
  released: Any
  source: str
  ours: Any = None
  why: str = ''


def _sh(script: str, line: int) -> str:
  return f'script `{script}`:{line}'


def _default(file: str, line: int) -> str:
  return f'default `{file}`:{line}'


def _common_behaviour(entry: str, per_gpu: int = 64) -> list[Row]:
  """Behaviour the config does not hold, the same for every ImageNet-scale
  experiment (`per_gpu`: images per GPU of the released runs)."""
  return [
      Row('lr and warm-up updates', '', 'per epoch, warm-up from lr/W',
          f'code `{entry}`', 'per step, warm-up from 0', PER_STEP),
      Row('BatchNorm statistics, mixup draws', '',
          f'per GPU ({per_gpu} images)',
          'code (no SyncBatchNorm)', 'over the global batch',
          'one jitted step over the global batch; per-device statistics '
          'would change with the device count'),
      Row('checkpoint evaluated', '', 'best by 1-draw validation accuracy',
          'eval scripts (`model_best`)', 'the final one',
          'the final model needs no validation-set selection'),
      Row('compute precision', 'precision.student', 'float32',
          'code (no autocast)', None, BF16),
  ]


def _imagenet(script: str, *, lr_line: int, wd: float, wd_line: int,
              epochs: int, epochs_line: int, warmup: int, warmup_src: str,
              beta: float, beta_src: str, stage1: dict | None,
              data: dict, smooth_line: int, entry='main_supervised_gendd.py',
              stage='gendd', lr: float = 2e-3, batch: int = 512,
              batch_line: int = 0, smooth: float = 0.9,
              per_gpu: int = 64, crop_line: int = 123) -> list[Row]:
  s = f'stages.{stage}'
  rows = [
      Row('optimiser', f'{s}.optimizer', 'adamw', f'code `{entry}`'),
      Row('lr', f'{s}.lr', lr, _sh(script, lr_line)),
      Row('weight decay', f'{s}.weight_decay', wd, _sh(script, wd_line)),
      Row('epochs', f'{s}.epochs', epochs, _sh(script, epochs_line)),
      Row('warm-up epochs', f'{s}.warmup_epochs', warmup, warmup_src),
      Row('schedule', f'{s}.schedule', 'cosine', f'code `{entry}` (`--cos`)'),
      Row('final lr', f'{s}.min_lr', 1e-6, _default(entry, 57)),
      Row('Adam beta2 from', f'{s}.beta2_min', 0.96, _default(entry, 121)),
      Row('Adam beta2 to', f'{s}.beta2_max', 0.999, _default(entry, 122)),
      Row('batch (global)', 'data.batch_size', batch,
          _sh(script, batch_line) if batch_line else 'script `-b`'),
      Row('contraction smooth', 'gendd.smooth', smooth,
          _sh(script, smooth_line)),
      Row('feature mixup Beta', 'gendd.beta', beta, beta_src),
      Row('diffusion_batch_mul', 'gendd.diffusion_batch_mul', 10,
          _default(entry, 117)),
      Row('token size', 'gendd.token_dim', 64, _default(entry, 118)),
      Row('head width', 'gendd.width', 1024, _default(entry, 116)),
      Row('head depth', 'gendd.depth', 3, 'code `models/diff_model.py`:11'),
      Row('condition dropout', 'gendd.cond_drop_prob', 0.2,
          _default(entry, 119)),
      Row('weight-decay exemptions', 'no_decay', ('head',),
          'code `param_groups_setup` (names with `diffloss`/`ln`: the head '
          'only; the condition LayerNorm is decayed)'),
      Row('sampling steps', 'sampler.steps', '64',
          'code `models/diff_model.py`:11'),
      Row('CFG scale', 'sampler.cfg_scale', 2.0,
          'code `models/diff_model.py`:128'),
      Row('draws averaged (standalone evaluation)',
          'sampler.eval_num_sampling', 5, 'eval scripts `--num_sampling 5`'),
      Row('crop scale', 'data.crop_scale', 0.6, _default(entry, crop_line)),
  ]
  for k, (value, src) in data.items():
    rows.append(Row(k.replace('_', ' '), f'data.{k}', value, src))
  if stage1 is None:
    rows.append(Row('stage-1', 'pipeline.stages', (stage,),
                    'scripts (no stage-1, no `--reload`)'))
  else:
    rows += [
        Row('stage-1', 'pipeline.stages', ('stage1', stage),
            'scripts (`main_gendd_pretrain.py`, then `--reload`)'),
        Row('stage-1 epochs', 'stages.stage1.epochs', 20,
            stage1['epochs']),
        Row('stage-1 lr', 'stages.stage1.lr', 2e-3, stage1['lr']),
        Row('stage-1 weight decay', 'stages.stage1.weight_decay', wd,
            stage1['wd']),
        Row('stage-1 warm-up', 'stages.stage1.warmup_epochs', 0,
            _default('main_gendd_pretrain.py', 115)),
        Row('stage-1 crop scale', 'stages.stage1.crop_scale', 0.08,
            'code `main_gendd_pretrain.py`:344 (torchvision\'s default)'),
        Row('stage-1 frozen', 'stages.stage1.frozen', ('fc',),
            'code `models/diff_model.py`:59 (the student\'s `fc`)'),
    ]
  return rows + _common_behaviour(entry, per_gpu)


def _regular():
  return dict(augment=('regular', _default('main_supervised_gendd.py', 96)),
              mixup=(0.0, _default('main_supervised_gendd.py', 100)),
              cutmix=(0.0, _default('main_supervised_gendd.py', 102)),
              label_smoothing=(0.0, _default('main_supervised_gendd.py', 93)))


def _rand(script: str, mixup: float, ls: float):
  return dict(augment=('rand', _sh(script, 50)),
              mixup=(mixup, _sh(script, 47)), cutmix=(1.0, _sh(script, 48)),
              label_smoothing=(ls, _sh(script, 49)))


_IN = 'GenDD_imagenet/sh/'
_R18 = _IN + 'imagenet_train_res34res18_gendd.sh'
_MBV1 = _IN + 'imagenet_train_res50mv_gendd.sh'
_A1 = _IN + 'imagenet_train_beitlr50_gendd_A1.sh'
_A2L = _IN + 'imagenet_train_beitlr50_gendd_A2.sh'
_A2B = _IN + 'imagenet_train_beitr50_gendd_A2.sh'
_BETA_DEFAULT = _default('main_supervised_gendd.py', 125)
_WARMUP_DEFAULT = _default('main_supervised_gendd.py', 115)


def _beit(script, wd, epochs, mixup, ls):
  return _imagenet(
      script, lr_line=39, wd=wd, wd_line=41, epochs=epochs, epochs_line=46,
      warmup=20, warmup_src=_WARMUP_DEFAULT, beta=0.0,
      beta_src=_sh(script, 45), smooth_line=44, batch_line=52,
      stage1=dict(epochs=_sh(script, 28), lr=_sh(script, 18),
                  wd=_sh(script, 19)),
      data=_rand(script, mixup, ls))


def _lt(script):
  entry = 'main_gendd_lt.py'
  rows = _imagenet(
      script, lr_line=20, wd=0.2, wd_line=22, epochs=100, epochs_line=26,
      warmup=20, warmup_src=_default(entry, 117), beta=1.0,
      beta_src=_default(entry, 127), smooth_line=25, smooth=0.0, batch=256,
      batch_line=28, stage1=None, entry=entry, per_gpu=32, crop_line=122,
      data=dict(augment=('regular', f'code `{entry}`:388')))
  return rows


def _lt_teacher():
  sh = 'GenDD_imagenet/sh_lt/imagenetlt_train_resnext101_sgd.sh'
  entry = 'main_lt_sgd.py'
  s = 'stages.teacher'
  return [
      Row('stage', 'stage', 'teacher', _sh(sh, 12)),
      Row('model', 'teacher.model', 'resnext101_32x4d', _sh(sh, 12)),
      Row('optimiser', f'{s}.optimizer', 'sgd', f'code `{entry}`:215'),
      Row('momentum', f'{s}.b1', 0.9, f'code `{entry}`:215'),
      Row('lr', f'{s}.lr', 0.1, _sh(sh, 18)),
      Row('weight decay (L2, every parameter)', f'{s}.weight_decay', 5e-4,
          _sh(sh, 19)),
      Row('batch (global)', 'data.batch_size', 256, _sh(sh, 20)),
      Row('epochs', f'{s}.epochs', 100, _default(entry, 44)),
      Row('warm-up epochs', f'{s}.warmup_epochs', 10, _default(entry, 89)),
      Row('schedule', f'{s}.schedule', 'cosine', f'code `{entry}`:543'),
      Row('final lr', f'{s}.min_lr', 0.0, _default(entry, 55)),
      Row('crop scale', f'{s}.crop_scale', 0.08,
          f'code `{entry}`:253 (torchvision\'s default)'),
      Row('lr and warm-up updates', '', 'per epoch, lr·e/W from 0, no +1 '
          'offset in the cosine', f'code `{entry}`:543-551',
          'per step, warm-up from 0',
          'the same schedule updated every step; this script\'s per-epoch '
          'form is one epoch behind the other released scripts\', which '
          '`lr_update=epoch` follows'),
      Row('compute precision', 'precision.student', 'float32',
          'code (no autocast)', None, BF16),
  ]


def _cc3m(script):
  entry = 'main_unsupervised_gendd.py'
  return _imagenet(
      script, lr_line=18, wd=2e-2, wd_line=19, epochs=100, epochs_line=22,
      warmup=20, warmup_src=_default(entry, 90), beta=1.0,
      beta_src=_default(entry, 99), smooth_line=21, smooth=0.0,
      batch_line=24,
      stage1=None, entry=entry, stage='gendd_unsup', crop_line=98,
      data=dict(augment=('regular', f'code `{entry}`:349'))) + [
          Row('steps per epoch', '', '5,501 (`--T` '
              '5500)', _default(entry, 109), 'one pass over the shards '
              '(~5,628)', 'an epoch is a pass over the data here; '
              '`--config.data.steps_per_epoch=5501` gives the released '
              'length')]


def _kl(script):
  entry = 'main_unsupervised_kd.py'
  return [
      Row('optimiser', 'stages.kl.optimizer', 'sgd', f'code `{entry}`:293'),
      Row('momentum', 'stages.kl.b1', 0.9, _default(entry, 56)),
      Row('lr', 'stages.kl.lr', 0.2, _sh(script, 18)),
      Row('weight decay', 'stages.kl.weight_decay', 1e-4, _sh(script, 19)),
      Row('warm-up epochs', 'stages.kl.warmup_epochs', 10, _sh(script, 21)),
      Row('epochs', 'stages.kl.epochs', 100, _sh(script, 22)),
      Row('final lr', 'stages.kl.min_lr', 1e-6, _default(entry, 55)),
      Row('temperature', 'kd.temperature', 1.0, f'code `{entry}`:441'),
      Row('frozen student parameters', 'stages.kl.frozen', ('fc',),
          f'code `{entry}`:224'),
  ] + _common_behaviour(entry)


_CIFAR_SH = 'GenDD_cifar/sh/'
_GD = 'train_student_gendd.py'
# Released CIFAR-100 pairs: config variant -> (script, smooth, its line).
CIFAR_SCRIPTS = {
    'resnet110-resnet32': ('train_res110_res32_gendd.sh', 0.9, 17),
    'resnet32x4-resnet8x4': ('train_res32x4_res8x4_gendd.sh', 0.7, 14),
    'resnet56-resnet20': ('train_res56_res20_gendd.sh', 0.9, 17),
    'vgg13-resnet20': ('train_vgg13res20_gendd.sh', 0.9, 16),
    'vgg13-vgg8': ('train_vgg13vgg8_gendd.sh', 0.7, 16),
    'wrn_40_2-resnet8x4': ('train_wrn402_res8x4_gendd.sh', 0.7, 14),
    'wrn_40_2-wrn_16_2': ('train_wrn402_wrn162_gendd.sh', 0.8, 17),
    'wrn_40_2-wrn_40_1': ('train_wrn402_wrn401_gendd.sh', 0.8, 17),
}


def _cifar(script, smooth, line):
  sh = _CIFAR_SH + script
  return [
      Row('stage-1 epochs', 'stages.stage1.epochs', 50,
          _sh(sh, line - 2) + ' (the last `--epochs`)'),
      Row('stage-1 lr', 'stages.stage1.lr', 3e-3, _sh(sh, line - 2)),
      Row('stage-1 weight decay', 'stages.stage1.weight_decay', 5e-2,
          _sh(sh, line - 2)),
      Row('stage-1 schedule', 'stages.stage1.schedule', 'cosine',
          'code `train_student_pretrain.py`:229'),
      Row('stage-1 frozen', 'stages.stage1.frozen', ('fc',),
          'code `models/diff_model.py`:58 (the student\'s `fc`)'),
      Row('optimiser', 'stages.gendd.optimizer', 'adamw', f'code `{_GD}`:240'),
      Row('lr', 'stages.gendd.lr', 1e-3, _sh(sh, line)),
      Row('weight decay', 'stages.gendd.weight_decay', 5e-2, _sh(sh, line)),
      Row('epochs', 'stages.gendd.epochs', 240, _sh(sh, line)),
      Row('warm-up epochs', 'stages.gendd.warmup_epochs', 50, _sh(sh, line)),
      Row('schedule', 'stages.gendd.schedule', 'step',
          f'code `{_GD}`:267 (no `--cos`)'),
      Row('decay epochs', 'stages.gendd.decay_epochs', (150, 180, 210),
          _default(_GD, 78)),
      Row('decay rate', 'stages.gendd.decay_rate', 0.1, _default(_GD, 79)),
      Row('lr between warm-up and epoch 150', '', '0.98 lr',
          f'code `{_GD}`:188 (not reset after warm-up)', 'lr',
          'the plateau below the configured lr is an artefact of the '
          'released function'),
      Row('Adam beta2 from', 'stages.gendd.beta2_min', 0.95,
          _default(_GD, 105)),
      Row('batch', 'data.batch_size', 64, _sh(sh, line)),
      Row('contraction smooth', 'gendd.smooth', smooth, _sh(sh, line)),
      Row('feature mixup Beta', 'gendd.beta', 1.0, _default(_GD, 107)),
      Row('diffusion_batch_mul', 'gendd.diffusion_batch_mul', 30,
          _sh(sh, line)),
      Row('token size', 'gendd.token_dim', 64, _default(_GD, 102)),
      Row('head width', 'gendd.width', 1024, _default(_GD, 100)),
      Row('condition dropout', 'gendd.cond_drop_prob', 0.2,
          _default(_GD, 103)),
      Row('weight-decay exemptions', 'no_decay', ('head',),
          f'code `{_GD}`:40'),
      Row('sampling steps', 'sampler.steps', '100',
          'code `models/diff_model.py`:10'),
      Row('draws averaged (standalone evaluation)',
          'sampler.eval_num_sampling', 5,
          'script `GenDD_cifar/sh/evaluate.sh`'),
      Row('compute precision', 'precision.student', 'float32',
          'code (no autocast)'),
      Row('lr updates', '', 'per epoch', f'code `{_GD}`:265', 'per step',
          PER_STEP),
  ]


def experiments() -> dict[str, tuple[str, list[Row]]]:
  """Config argument -> (what it is, its rows)."""
  out = {
      'r18_from_r34': ('ImageNet, ResNet-34 -> ResNet-18', _imagenet(
          _R18, lr_line=35, wd=2e-2, wd_line=37, epochs=100, epochs_line=40,
          warmup=10, warmup_src=_sh(_R18, 41), beta=1.0,
          beta_src=_BETA_DEFAULT, smooth_line=39, batch_line=43,
          stage1=dict(epochs=_sh(_R18, 24), lr=_sh(_R18, 19),
                      wd=_sh(_R18, 20)), data=_regular())),
      'mbv1_from_r50': ('ImageNet, ResNet-50 -> MobileNetV1', _imagenet(
          _MBV1, lr_line=34, wd=2e-2, wd_line=36, epochs=100, epochs_line=39,
          warmup=20, warmup_src=_WARMUP_DEFAULT, beta=1.0,
          beta_src=_BETA_DEFAULT, smooth_line=38, batch_line=41,
          stage1=dict(epochs=_sh(_MBV1, 23), lr=_sh(_MBV1, 18),
                      wd=_sh(_MBV1, 19)), data=_regular())),
      'r50_600ep': ('ImageNet, BEiT-v2-L -> ResNet-50, A1 (600 epochs)',
                    _beit(_A1, 1e-2, 600, 0.2, 0.1)),
      'r50_from_beitv2l': ('ImageNet, BEiT-v2-L -> ResNet-50, A2',
                           _beit(_A2L, 2e-2, 300, 0.1, 0.0)),
      'r50_from_beitv2b': ('ImageNet, BEiT-v2-B -> ResNet-50, A2',
                           _beit(_A2B, 2e-2, 300, 0.1, 0.0)),
      'imagenet_lt:r50': ('ImageNet-LT, ResNeXt-101 -> ResNet-50', _lt(
          'GenDD_imagenet/sh_lt/imagenetlt_train_resnext101_res50_gendd.sh')),
      'imagenet_lt:r18': ('ImageNet-LT, ResNeXt-101 -> ResNet-18', _lt(
          'GenDD_imagenet/sh_lt/train_resnext101_res18_gendd.sh')),
      'imagenet_lt:teacher': ('ImageNet-LT teacher, ResNeXt-101 (32x4d) '
                              'from scratch', _lt_teacher()),
      'cc3m_unsup:r18': (
          'CC3M unsupervised GenDD, ResNet-34 -> ResNet-18',
          _cc3m(_IN + 'cc3m_train_res34res18_unsupervised_gendd.sh')),
      'cc3m_unsup:mbv1': (
          'CC3M unsupervised GenDD, ResNet-50 -> MobileNetV1',
          _cc3m(_IN + 'cc3m_train_res50mv_unsupervised_gendd.sh')),
      'cc3m_unsup:mbv1_kl': (
          'CC3M unsupervised KL baseline, ResNet-50 -> MobileNetV1',
          _kl(_IN + 'cc3m_train_res50mv_unsupervised_kd.sh')),
  }
  for pair, (script, smooth, line) in CIFAR_SCRIPTS.items():
    out[f'cifar100_gendd:{pair}'] = (f'CIFAR-100, {pair.replace("-", " -> ")}',
                                     _cifar(script, smooth, line))
  return out


def load_config(arg: str):
  stem, _, variant = arg.partition(':')
  spec = importlib.util.spec_from_file_location(
      f'recipe_config_{stem}', os.path.join(ROOT, 'configs', f'{stem}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def lookup(config, key: str):
  value = config
  for part in key.split('.'):
    value = value[part]
  return tuple(value) if isinstance(value, (list, tuple)) else value


def resolved(arg: str, config=None) -> list[tuple[Row, Any, Any]]:
  """`(row, released value, our value)` for every row of `arg` (its config
  loaded unless given)."""
  config = load_config(arg) if config is None else config
  out = []
  for row in experiments()[arg][1]:
    ours = lookup(config, row.key) if row.key else row.ours
    out.append((row, row.released, ours))
  return out


def unexplained(arg: str, config=None) -> list[str]:
  """The rows of `arg` where ours differs from the release with no reason
  given: what the drift test fails on."""
  return [f'{arg}: {row.what} ({row.key}): released {_fmt(released)}, ours '
          f'{_fmt(ours)}' for row, released, ours in resolved(arg, config)
          if released != ours and not row.why]


def _fmt(v) -> str:
  if isinstance(v, tuple):
    return '(' + ', '.join(str(x) for x in v) + ')'
  if isinstance(v, float):
    return f'{v:g}'
  return str(v)


def render() -> str:
  lines = [
      '# The paper\'s recipes: released values and ours',
      '',
      'Generated by `python -m tools.recipes` from the configs; '
      '`tests/test_recipes.py` fails when a config drifts from a released '
      'value without a stated reason, or when this file is stale.',
      '',
      'Released values come from the authors\' repository at commit '
      '`9246d0b`: the shell script that passes a flag (file:line), else the '
      'argparse default that applies (file:line in the entry point), else '
      'the code. "ours" is the config key\'s value.',
      '',
  ]
  for arg, (title, _) in experiments().items():
    lines += [f'## `{arg}`: {title}', '',
              '| hyperparameter | released | source | ours | '
              'why ours differs |',
              '|---|---|---|---|---|']
    for row, released, ours in resolved(arg):
      where = f'`{row.key}` = {_fmt(ours)}' if row.key else _fmt(ours)
      lines.append(f'| {row.what} | {_fmt(released)} | {row.source} | '
                   f'{where} | {row.why} |')
    lines.append('')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  text = render()
  if '--check' in argv:
    with open(DOC) as f:
      if f.read() != text:
        print(f'{DOC} is stale: run python -m tools.recipes', file=sys.stderr)
        return 1
    return 0
  with open(DOC, 'w') as f:
    f.write(text)
  print(f'wrote {DOC}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
