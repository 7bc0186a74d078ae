"""Building blocks shared by the files in `configs/`.

Configs stay the single source of hyperparameters; this module only fixes the
shape of the recurring blocks so every config names the same keys, parses the
argument after the config file's ':' (`parse_arg`) and shrinks any config to
a laptop-sized run of the same wiring (`tiny`).

Config arguments: tokens separated by ',' (or ':'), e.g.
`configs/cifar100_gendd.py:resnet56-resnet20,tiny`, `configs/r50_600ep.py:tiny`
or `configs/cc3m_unsup.py:variant=mbv1_kl,tiny`. A bare word names the
config's variant (its first setting), `tiny` switches the shrink on, and
`key=value` sets any other setting a config declares.
"""

from __future__ import annotations

import re

import ml_collections


def stage(epochs: float, lr: float, *, weight_decay: float = 1e-4,
          warmup_epochs: float = 0.0, optimizer: str = 'adamw',
          schedule: str = 'cosine', decay_epochs: tuple[float, ...] = (),
          decay_rate: float = 0.1, min_lr: float = 0.0, b1: float = 0.9,
          nesterov: bool = False, beta2_min: float = 0.999,
          beta2_max: float = 0.999, frozen: tuple[str, ...] = (),
          crop_scale: float = 0.0, lr_update: str = 'step'
          ) -> ml_collections.ConfigDict:
  """One stage's optimiser settings (epochs may be fractional).

  Args:
    epochs: length of the stage.
    lr: peak learning rate (after `warmup_epochs` of linear warm-up).
    weight_decay: decoupled for 'adamw'; added to the gradient (L2, as torch's
      `SGD(weight_decay=...)`) for 'sgd'.
    warmup_epochs: linear warm-up from 0.
    optimizer: 'adamw' or 'sgd'.
    schedule: 'cosine' (to `min_lr`), 'step' (times `decay_rate` at each of
      `decay_epochs`) or 'constant'.
    decay_epochs: epochs of the 'step' schedule's decays.
    decay_rate: factor of each 'step' decay.
    min_lr: end value of the cosine schedule.
    b1: Adam beta1, or the SGD momentum.
    nesterov: Nesterov momentum for 'sgd'.
    beta2_min: Adam beta2 at the start (it rises by a half cosine).
    beta2_max: Adam beta2 at the end.
    frozen: names of parameters (path components, e.g. 'fc') never updated.
    crop_scale: this stage's random-resized-crop scale (0: `data.crop_scale`).
    lr_update: 'step' (the learning rate changes every step, warm-up from
      0) or 'epoch' (once per epoch, exactly as the released code:
      `optim.learning_rate` gives the formulas).
  """
  return ml_collections.ConfigDict(dict(
      epochs=float(epochs), lr=lr, weight_decay=weight_decay,
      warmup_epochs=float(warmup_epochs), optimizer=optimizer,
      schedule=schedule, decay_epochs=tuple(float(e) for e in decay_epochs),
      decay_rate=decay_rate, min_lr=min_lr, b1=b1, nesterov=nesterov,
      beta2_min=beta2_min, beta2_max=beta2_max, frozen=tuple(frozen),
      crop_scale=float(crop_scale), lr_update=lr_update))


def teacher_block(model: str, **settings) -> ml_collections.ConfigDict:
  """The teacher: its model, its export (`checkpoint`), and where its
  outputs come from during training: 'model' (a forward pass per step) or
  'precomputed' (`features`, from `python -m gendd_jax.cli.precompute`)."""
  return ml_collections.ConfigDict(dict(
      model=model, checkpoint='', source='model', features='', **settings))


def precompute_block() -> ml_collections.ConfigDict:
  """Settings of `python -m gendd_jax.cli.precompute`: augmented `views` per
  example beside the deterministic one, their seed, the stored dtype,
  whether to keep logits (for kd/kl), records per shard."""
  return ml_collections.ConfigDict(dict(
      views=0, aug_seed=0, dtype='float32', logits=False,
      shard_size=100_000))


def runtime(c: ml_collections.ConfigDict, *, log_every_steps: int = 200,
            checkpoint_every_steps: int = 5000, eval_every_steps: int = 0,
            keep_checkpoints: int = 2) -> ml_collections.ConfigDict:
  """Adds the settings every config shares to `c` (in place) and returns it.

  mesh: axis name -> size (-1: every device). Only `data` exists today.
  precision: compute dtype per role ('float32', 'bfloat16', 'float16');
    parameters and optimizer state always stay float32.
  grad_accum_steps: micro-batches per optimizer step (the global batch
    `data.batch_size` is split into this many).
  on_nonfinite: 'stop' (name the step and the last good checkpoint) or
    'skip' (drop such steps and carry on); either way the update of a step
    with a non-finite loss or gradient is never applied.
  eval_every_steps: evaluate every so many steps during training (0: only
    at the end), cheaply: the probe and a one-step posterior mean
    (`settings.periodic_eval_settings`) on the first `eval_subset_batches`
    evaluation batches (0: all); the configured sampler runs at the end.
  profile_steps: trace this many steps (from step 10) with the JAX profiler
    into `workdir/plugins/profile` (0: off).
  tensorboard_dir: where TensorBoard event files and profiles go ('': the
    workdir). TensorFlow writes them with its own GCS client, which reaches
    only the real `gs://`; everything else uses `gendd_jax.paths`.
  allow_config_changes: resume from a checkpoint even where the config
    differs from the one it was saved with in what the state depends on
    (schedule, model, batch, data); by default such a resume is refused with
    the differing keys (`reliability.SAFE_TO_CHANGE` lists what may always
    change).
  fast_compile: compile with XLA's backend optimisation off (`XLA_FLAGS`
    `--xla_backend_optimization_level=0`, expensive LLVM passes disabled),
    set by the launcher before JAX starts its backend. Compilation takes
    about half as long and the compiled steps run slower: for smoke tests
    (`:tiny` turns it on), never for training.
  """
  c.mesh = ml_collections.ConfigDict(dict(data=-1))
  c.precision = ml_collections.ConfigDict(dict(
      student='float32', teacher='float32', head='float32'))
  c.grad_accum_steps = 1
  c.on_nonfinite = 'stop'
  c.log_every_steps = log_every_steps
  c.eval_every_steps = eval_every_steps
  c.checkpoint_every_steps = checkpoint_every_steps
  c.keep_checkpoints = keep_checkpoints
  c.eval_subset_batches = 0
  c.profile_steps = 0
  c.allow_config_changes = False
  c.tensorboard_dir = ''
  c.fast_compile = False
  return c


# Networks whose reference learning rate is 0.01: as teachers (instead of
# 0.05), and as GenDD students (instead of 1e-3; the reference code forces it).
_CIFAR_LOW_LR = ('mobilenetv2', 'shufflev1', 'shufflev2')


def cifar100(teacher: str = 'resnet32x4', student: str = 'resnet8x4'
             ) -> ml_collections.ConfigDict:
  """CIFAR-100 settings of the reference scripts, for any stage.

  Teacher training: SGD (momentum 0.9, weight decay 5e-4), 240 epochs, batch
  64, lr 0.05 (0.01 for MobileNetV2/ShuffleNet) decayed 10x at epochs 150,
  180 and 210, pad-4 crop and flip. GenDD: stage-1 50 epochs, lr 3e-3,
  weight decay 5e-2, cosine; stage-2 240 epochs, lr 1e-3 (0.01 for
  MobileNetV2/ShuffleNet students, as the reference code forces), warm-up
  50, then the step schedule (10x at epochs 150, 180 and 210: the released
  scripts pass no `--cos`), smooth 0.7, Beta(1, 1) feature mixup, token
  64, head width 1024 and depth 3, diffusion_batch_mul 30, 100-step sampling
  with CFG 2; standalone evaluation averages 5 draws. Weight decay spares
  only the diffusion head (`no_decay`; the condition LayerNorm is decayed,
  as in the reference). `docs/recipes.md` lists every value with its source.
  """
  c = ml_collections.ConfigDict()
  c.stage = 'teacher'
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name='cifar100', data_dir='', augment='cifar', fold=0, num_folds=1,
      label_fraction=1.0, batch_size=64, eval_batch_size=500))
  c.teacher = teacher_block(teacher)
  c.student = ml_collections.ConfigDict(dict(model=student, init_from=''))
  c.gendd = ml_collections.ConfigDict(dict(
      token_dim=64, width=1024, depth=3, diffusion_batch_mul=30, smooth=0.7,
      beta=1.0, cond_drop_prob=0.2, use_vb=True, noise_schedule='cosine',
      diffusion_steps=1000, target_norm='none', remat=False))
  c.sampler = ml_collections.ConfigDict(dict(
      kind='ancestral', steps='100', eval_kind='ancestral', eval_steps='100',
      cfg_scale=2.0, temperature=1.0, num_sampling=1, eval_num_sampling=5,
      clip_x0='none', also_eval_clipped=True))
  c.kd = ml_collections.ConfigDict(dict(
      temperature=4.0, ce_weight=1.0, kd_weight=1.0))
  c.no_decay = ('head',)
  teacher_lr = 0.01 if teacher in _CIFAR_LOW_LR else 0.05
  gendd_lr = 0.01 if student in _CIFAR_LOW_LR else 1e-3
  sgd = dict(optimizer='sgd', schedule='step',
             decay_epochs=(150, 180, 210), decay_rate=0.1, b1=0.9)
  c.stages = ml_collections.ConfigDict(dict(
      teacher=stage(240, teacher_lr, weight_decay=5e-4, **sgd),
      scratch=stage(240, 0.05, weight_decay=5e-4, **sgd),
      kd=stage(240, 0.05, weight_decay=5e-4, **sgd),
      kl=stage(240, 0.05, weight_decay=5e-4, **sgd),
      stage1=stage(50, 3e-3, weight_decay=5e-2, frozen=('fc',)),
      gendd=stage(240, gendd_lr, weight_decay=5e-2, warmup_epochs=50,
                  beta2_min=0.95, schedule='step',
                  decay_epochs=(150, 180, 210)),
      gendd_unsup=stage(240, gendd_lr, weight_decay=5e-2, warmup_epochs=50,
                        beta2_min=0.95, schedule='step',
                        decay_epochs=(150, 180, 210)),
  ))
  c.precompute = precompute_block()
  # A cheap validation number every 5000 steps (about 6 epochs at batch
  # 64) on 20 evaluation batches (see `runtime`).
  runtime(c, eval_every_steps=5000)
  c.eval_subset_batches = 20
  return c


def image_data(name: str, *, image_size: int = 224, augment: str = 'regular',
               batch_size: int = 512, eval_batch_size: int = 500,
               mixup: float = 0.0, cutmix: float = 0.0,
               label_smoothing: float = 0.0, num_classes: int = 0,
               train_split: str = 'train', eval_split: str = 'validation'
               ) -> ml_collections.ConfigDict:
  """A TFDS/builder image dataset read through grain.

  `name` is '<kind>:<name>': 'tfds:imagenet2012', or a dataset made by
  `python -m gendd_jax.cli.build_dataset` ('folder:...', 'imagenet_lt:...',
  'unlabeled:...', 'npz:...'). `augment` is 'regular' (random resized crop
  0.6-1 + flip), 'rand' (plus colour jitter and RandAugment m7), 'cifar' or
  'none'; evaluation uses resize + centre crop. Mixup/CutMix (switch
  probability 0.5) and label smoothing make soft labels. `num_threads`,
  `prefetch` and `num_workers` (worker processes; resume needs the same
  value) size the host pipeline; `stats_batches` caps the pass over the
  training set for target statistics (0: all). `eval_name` evaluates on
  another dataset (needed when the training set has no labels).
  `crop_scale` is the smallest area fraction of the random resized crop
  ('regular' and 'rand'; a stage may set its own, `stages.<s>.crop_scale`).
  `shot_groups` also reports many-, medium- and few-shot top-1 (classes
  with more than 100, 20 to 100, fewer than 20 training images; the mean
  of the classes' accuracies), for long-tailed data. `steps_per_epoch` fixes
  the length of an epoch of the schedules in steps (0: one pass over the
  training set), as the released CC3M runs do (`--T`).
  `in_memory_limit_mb`: a training split whose decoded images (each
  process's slice, uint8) take less is decoded once, when training first
  reads it, and served from memory: the same stream (0: always stream
  through grain).
  """
  return ml_collections.ConfigDict(dict(
      name=name, eval_name='', data_dir='', train_split=train_split,
      eval_split=eval_split, image_size=image_size, augment=augment,
      num_classes=num_classes, batch_size=batch_size,
      eval_batch_size=eval_batch_size, label_fraction=1.0, mixup=mixup,
      cutmix=cutmix, mix_switch_prob=0.5, label_smoothing=label_smoothing,
      num_threads=16, prefetch=512, num_workers=0, stats_batches=20,
      crop_scale=0.6, shot_groups=False, steps_per_epoch=0,
      in_memory_limit_mb=2048.0))


def _student(model: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model=model, init_from=''))


def _gendd_head(**overrides) -> ml_collections.ConfigDict:
  """The diffusion head and objective (token 64, width 1024, depth 3)."""
  g = dict(token_dim=64, width=1024, depth=3, diffusion_batch_mul=10,
           smooth=0.9, beta=1.0, cond_drop_prob=0.2, use_vb=True,
           noise_schedule='cosine', diffusion_steps=1000, target_norm='none',
           remat=False)
  g.update(overrides)
  return ml_collections.ConfigDict(g)


def _sampler(steps: str) -> ml_collections.ConfigDict:
  """CFG sampling as in the paper's evaluation (scale 2, temperature 1).
  `kind`/`steps` are the training loop's evaluation sampler;
  `eval_kind`/`eval_steps` the defaults of `python -m gendd_jax.cli.evaluate`
  (the paper's sampler here: the few-step study was not run at this scale;
  `python -m gendd_jax.cli.sweep_sampling` measures it on a trained model).
  The paper averages 5 draws per image: `eval_num_sampling`, the default of
  `python -m gendd_jax.cli.evaluate`; training-time evaluation uses
  `num_sampling` (one)."""
  return ml_collections.ConfigDict(dict(
      kind='ancestral', steps=steps, eval_kind='ancestral', eval_steps=steps,
      cfg_scale=2.0, temperature=1.0, num_sampling=1, eval_num_sampling=5,
      clip_x0='none', also_eval_clipped=False))


def _kd() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(temperature=4.0, ce_weight=1.0,
                                        kd_weight=1.0))


def distillation(*, teacher: str, student: str, data: ml_collections.ConfigDict,
                 stages: dict[str, ml_collections.ConfigDict],
                 flow: tuple[str, ...], gendd: ml_collections.ConfigDict,
                 sampler_steps: str, beta2_min: float,
                 compute_dtype: str = 'bfloat16'
                 ) -> ml_collections.ConfigDict:
  """A distillation experiment: the stages of `flow` run in order, each in
  `<workdir>/<stage>`, stage-1's export initialising stage-2's student.

  `stages` holds every stage's optimiser settings; each GenDD stage's Adam
  beta2 rises from `beta2_min` to 0.999. The teacher export is given at run
  time (`--config.teacher.checkpoint`, from `python -m gendd_jax.cli.convert`).
  """
  c = ml_collections.ConfigDict()
  c.stage = 'pipeline'
  c.seed = 0
  c.data = data
  c.teacher = teacher_block(teacher)
  c.student = _student(student)
  c.gendd = gendd
  c.sampler = _sampler(sampler_steps)
  c.kd = _kd()
  c.no_decay = ('head',)
  for name in ('gendd', 'gendd_unsup'):
    if name in stages:
      stages[name].beta2_min = beta2_min
  c.stages = ml_collections.ConfigDict(stages)
  c.pipeline = ml_collections.ConfigDict(dict(protocol='sequence',
                                              stages=tuple(flow)))
  c.precompute = precompute_block()
  # A cheap validation number every 2000 steps (about 4 ImageNet epochs at
  # batch 1024; see `runtime`) on 20 evaluation batches.
  runtime(c, log_every_steps=100, checkpoint_every_steps=2000,
          eval_every_steps=2000)
  c.eval_subset_batches = 20
  for role in ('student', 'teacher', 'head'):
    c.precision[role] = compute_dtype
  return c


# Sizes of the training sets the configs are written for (used by the
# schedule tests and the start-up summary's epoch arithmetic).
TRAIN_EXAMPLES = {'imagenet2012': 1_281_167, 'cifar100': 50_000,
                  'imagenet_lt': 115_846, 'cc3m': 2_882_000}


def imagenet(teacher: str, student: str, *, epochs: float,
             weight_decay: float, warmup_epochs: float = 20.0,
             lr: float = 2e-3, batch_size: int = 512, smooth: float = 0.9,
             beta: float = 1.0, augment: str = 'regular', mixup: float = 0.0,
             cutmix: float = 0.0, label_smoothing: float = 0.0,
             stage1: bool = True, stage1_epochs: float = 20.0,
             dataset: str = 'tfds:imagenet2012', unsupervised: bool = False,
             eval_name: str = '', diffusion_batch_mul: int = 10
             ) -> ml_collections.ConfigDict:
  """An ImageNet-scale GenDD experiment of the paper; the defaults are the
  reference code's (warm-up 20 epochs, Beta(1, 1) feature mixup).

  Supervised: stage-1 (`stage1_epochs`, lr 2e-3, AdamW, crops from 8% of
  the image area; skipped with `stage1=False`) then GenDD (crops from 60%)
  with distribution contraction `smooth`.
  Unsupervised (`unsupervised=True`): GenDD with smooth 0 and no labels, no
  stage-1 (it needs labels), plus the released KL baseline under
  `stages.kl` (SGD lr 0.2, momentum 0.9, weight decay 1e-4, warm-up 10,
  temperature 1, the student's classifier frozen at its initialisation).
  Cosine schedules with linear warm-up, down to 1e-6; AdamW beta2 0.96 ->
  0.999 for GenDD; 64-step CFG sampling, 5 draws in standalone evaluation.
  """
  data = image_data(dataset, image_size=224, augment=augment,
                    batch_size=batch_size, eval_batch_size=500, mixup=mixup,
                    cutmix=cutmix, label_smoothing=label_smoothing)
  data.eval_name = eval_name
  main = stage(epochs, lr, weight_decay=weight_decay,
               warmup_epochs=warmup_epochs, min_lr=1e-6)
  if unsupervised:
    stages = dict(gendd_unsup=main,
                  kl=stage(epochs, 0.2, weight_decay=1e-4, warmup_epochs=10,
                           optimizer='sgd', b1=0.9, min_lr=1e-6,
                           frozen=('fc',)))
    flow = ('gendd_unsup',)
    smooth = 0.0
  else:
    stages = dict(stage1=stage(stage1_epochs, 2e-3, weight_decay=weight_decay,
                               min_lr=1e-6, crop_scale=0.08, frozen=('fc',)),
                  gendd=main)
    flow = ('stage1', 'gendd') if stage1 else ('gendd',)
  c = distillation(
      teacher=teacher, student=student, data=data, stages=stages, flow=flow,
      gendd=_gendd_head(smooth=smooth, beta=beta,
                        diffusion_batch_mul=diffusion_batch_mul),
      sampler_steps='64', beta2_min=0.96)
  if unsupervised:
    c.kd.temperature = 1.0  # The released KL baseline's.
  return c


# Distribution contraction of the released CIFAR-100 scripts, per pair (the
# first eight); the pairs no released script covers use 0.7.
CIFAR_PAIRS = {
    'resnet32x4-resnet8x4': 0.7, 'resnet56-resnet20': 0.9,
    'resnet110-resnet32': 0.9, 'wrn_40_2-wrn_16_2': 0.8,
    'wrn_40_2-wrn_40_1': 0.8, 'vgg13-vgg8': 0.7, 'vgg13-resnet20': 0.9,
    'wrn_40_2-resnet8x4': 0.7,
    'resnet32x4-shufflev1': 0.7, 'resnet32x4-shufflev2': 0.7,
    'vgg13-mobilenetv2': 0.7, 'cifar_resnet50-mobilenetv2': 0.7,
}


def cifar100_gendd(pair: str) -> ml_collections.ConfigDict:
  """A CIFAR-100 pair of the paper: stage-1 (50 epochs, lr 3e-3, weight decay
  5e-2, batch 64) then GenDD (240 epochs, lr 1e-3, warm-up 50, weight decay
  5e-2, diffusion_batch_mul 30, 100-step CFG sampling, float32)."""
  if pair not in CIFAR_PAIRS:
    raise ValueError(f'unknown CIFAR-100 pair {pair!r}; expected one of '
                     f'{", ".join(CIFAR_PAIRS)}')
  teacher, student = pair.split('-')
  c = cifar100(teacher, student)
  c.stage = 'pipeline'
  c.gendd.smooth = CIFAR_PAIRS[pair]
  c.pipeline = ml_collections.ConfigDict(dict(protocol='sequence',
                                              stages=('stage1', 'gendd')))
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """The argument after a config file's ':' as settings.

  `defaults` declares the settings and their defaults; the first one is
  positional (a bare word sets it, normally the variant; with no settings a
  bare word other than `tiny` is an error). `tiny=False` is
  always declared: the bare word `tiny` switches it on. Tokens are separated
  by ',' or ':'; `key=value` sets `key`, converted to its default's type
  (bools from 0/1/true/false). An unknown key, a second bare word, or a value
  that does not convert is a `ValueError`.
  """
  positional = next(iter(defaults), None)
  defaults = dict(defaults)
  defaults.setdefault('tiny', False)
  out = dict(defaults)
  seen_positional = False
  for token in re.split('[,:]', arg or ''):
    token = token.strip()
    if not token:
      continue
    if '=' in token:
      key, value = (t.strip() for t in token.split('=', 1))
    elif token == 'tiny':
      key, value = 'tiny', 'true'
    else:
      if positional is None:
        raise ValueError(f'config argument {arg!r}: this config has no '
                         f'variant {token!r}; it takes ' +
                         ', '.join(sorted(defaults)))
      if seen_positional:
        raise ValueError(f'config argument {arg!r}: more than one bare word '
                         f'({out[positional]!r}, {token!r}); use key=value')
      key, value = positional, token
      seen_positional = True
    if key not in defaults:
      raise ValueError(f'config argument {arg!r}: unknown setting {key!r}; '
                       f'expected {", ".join(defaults)}')
    out[key] = _convert(defaults[key], value, key)
  return ml_collections.ConfigDict(out)


def _convert(default, value: str, key: str):
  if isinstance(default, bool):
    if value.lower() in ('1', 'true', 'yes'):
      return True
    if value.lower() in ('0', 'false', 'no'):
      return False
    raise ValueError(f'config setting {key}={value!r} is not a boolean')
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ValueError(f'config setting {key}={value!r} is not a '
                       f'{type(default).__name__}') from None
  return value


# Reduced BEiT widths of the tiny runs (patch 16 on 32x32 images: 4 tokens).
TINY_BEIT = dict(embed_dim=32, depth=1, num_heads=2)
# ImageNet ResNets/ResNeXts and MobileNetV1: `:tiny` keeps one block per
# stage (per width), `blocks=1` (their compilation dominates a two-step run
# on a CPU).
_TINY_BLOCKS = ('resnet18', 'resnet34', 'resnet50', 'resnet101',
                'resnext50_32x4d', 'resnext101_32x4d', 'resnext101_32x8d',
                'mobilenet_v1')
TINY_BATCH = 4
# Test examples of a tiny sequence run: digits32 in 20 folds, fold 0.
_TINY_SEQUENCE_FOLDS = 20
_DIGITS = 1797


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `c` (in place) to a run of two steps per stage that needs no
  download and no teacher file; returns it.

  Kept as configured: the stages, the student and teacher architectures
  (BEiTs at `TINY_BEIT` width and depth; ImageNet ResNets, ResNeXts and
  MobileNetV1 at one block per stage with their widths and feature sizes),
  precision, the optimisers and their schedules' shapes (warm-up and decays
  scaled with the epochs).
  Changed: the data become the in-memory digits at 32x32x3 ('digits32':
  1,797 images, 10 classes, no files; the 8x8 'digits' stay as they are),
  batch 4, one target-statistics batch; the k-fold protocol keeps 2 folds and
  one seed, a sequence uses fold 0 of 20 (90 test images). The in-memory
  data offer the 'cifar' crop and flip only, so 'regular'/'rand'
  augmentation becomes 'cifar', and mixup, CutMix and label smoothing (grain
  path only) are dropped. A sequence without a 'teacher' stage distils from
  the teacher architecture at its random initialisation
  (`teacher.source='random'`: no file, no extra stage). The diffusion head
  is token 16, width 32, depth 1, diffusion_batch_mul 2, with 2-step
  sampling (the paper's sampler beside a configured one too). Nothing is
  checkpointed mid-run; every step is logged; XLA compiles without backend
  optimisation (`fast_compile`).
  """
  kfold = c.stage == 'pipeline' and c.pipeline.get('protocol') == 'kfold'
  folds = 2 if kfold else _TINY_SEQUENCE_FOLDS
  old = c.data
  name = 'digits' if old.name == 'digits' else 'digits32'
  c.data = ml_collections.ConfigDict(dict(
      name=name, data_dir='',
      augment='cifar' if name == 'digits32' and old.augment != 'none'
      else 'none',
      fold=0, num_folds=folds, label_fraction=old.get('label_fraction', 1.0),
      batch_size=TINY_BATCH, eval_batch_size=45, stats_batches=1))
  if kfold:
    c.pipeline.seeds = (0,)
  elif c.stage == 'pipeline' and 'teacher' not in c.pipeline.stages:
    # No teacher file: the teacher architecture at its random init.
    c.teacher.source = 'random'
    c.teacher.checkpoint = ''
  for role in (c.teacher, c.student):
    if role.model.startswith('beit'):
      role.update(TINY_BEIT)
    elif role.model in _TINY_BLOCKS:
      role.blocks = 1  # Same blocks and widths, one per stage.
  c.gendd.update(token_dim=16, width=32, depth=1, diffusion_batch_mul=2)
  c.sampler.steps = '2'
  if 'published_steps' in c.sampler:
    c.sampler.published_steps = '2'
  c.sampler.num_sampling = 1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 0
  c.fast_compile = True  # Compilation is most of a two-step run's time.
  # Training examples of fold 0 within one of the exact count; 2.5 steps'
  # worth of epochs truncates to two steps either way.
  train_examples = _DIGITS - _DIGITS // folds
  steps_per_epoch = train_examples // TINY_BATCH
  for s in c.stages.values():
    scale = 2.5 / steps_per_epoch / s.epochs
    s.epochs *= scale
    s.warmup_epochs *= scale
    s.decay_epochs = tuple(e * scale for e in s.decay_epochs)
  return c
