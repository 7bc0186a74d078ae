"""Config -> frozen settings: every default and validation of a training run.

`train` reads the ConfigDict only through this module; the dataclasses it
returns are hashable, so the jitted steps built from them are cached (a
k-fold protocol compiles each stage once).
"""

from __future__ import annotations

import copy
import dataclasses

from gendd_jax import diffusion
from gendd_jax import gendd
from gendd_jax import optim
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax.errors import ConfigError

ON_NONFINITE = ('stop', 'skip')
TARGET_NORMS = ('none', 'standardize')
LR_UPDATES = ('step', 'epoch')


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything the jitted steps of one stage close over."""
  stage: str
  optim: optim.OptimSpec
  seed: int
  # Gradient accumulation: the batch is split into this many micro-batches
  # whose gradients are averaged before one optimizer update.
  accum_steps: int = 1
  kd_temperature: float = 4.0
  ce_weight: float = 1.0
  kd_weight: float = 1.0
  smooth: float = 0.0
  beta: float = 0.0
  # Evaluation also reports the linear probe's predictions.
  probe: bool = False
  loss: gendd.LossSettings | None = None
  sample: gendd.SampleSettings | None = None
  noise_schedule: str = 'cosine'
  diffusion_steps: int = 1000
  sampling_steps: str = '64'
  # Clip the sampler's x0 estimate to the training targets' range (the bound
  # is data, `Teacher.clip_bound`, so folds share one compile).
  clip_to_data: bool = False
  # Also evaluate the data-clipped sampler beside the configured one.
  also_clipped: bool = False
  # Also evaluate the paper's sampler as published (ancestral, no clipping,
  # no change to the noise, `published_steps`) beside a configured one that
  # clips, thresholds or changes the noise.
  also_published: bool = False
  published_steps: str = '64'
  published_cfg_scale: float = 2.0
  # Teacher outputs come precomputed in the batch (`teacher_feature`,
  # `teacher_logits`); the training step runs no teacher forward.
  precomputed: bool = False


def epoch_steps(config, stream_steps: int) -> int:
  """Steps per epoch of the schedules: `data.steps_per_epoch` when set,
  else one pass over the training set (`stream_steps`)."""
  fixed = config.data.get('steps_per_epoch', 0)
  if not isinstance(fixed, int) or fixed < 0:
    raise ConfigError(f'data.steps_per_epoch must be a non-negative integer '
                      f'(0: one pass over the data), got {fixed!r}')
  return fixed or stream_steps


def optim_spec(config, stage: str, steps_per_epoch: int) -> optim.OptimSpec:
  """The optimizer settings of `stage`, validated."""
  if stage not in config.stages:
    raise ConfigError(f'this config has no optimiser settings for stage '
                      f'{stage!r} (config.stages has '
                      f'{", ".join(config.stages)})')
  s = config.stages[stage]
  total = int(s.epochs * steps_per_epoch)
  if total <= 0:
    raise ConfigError(f'stage {stage!r} has no training steps '
                      f'(epochs={s.epochs})')
  if s.schedule not in optim.SCHEDULES:
    raise ConfigError(f'stages.{stage}.schedule={s.schedule!r}; expected one '
                      f'of {", ".join(optim.SCHEDULES)}')
  lr_update = s.get('lr_update', 'step')
  if lr_update not in LR_UPDATES:
    raise ConfigError(f'stages.{stage}.lr_update={lr_update!r}; expected '
                      f'one of {", ".join(LR_UPDATES)}')
  if s.optimizer not in optim.OPTIMIZERS:
    raise ConfigError(f'stages.{stage}.optimizer={s.optimizer!r}; expected '
                      f'one of {", ".join(optim.OPTIMIZERS)}')
  return optim.OptimSpec(
      name=s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
      total_steps=total, warmup_steps=int(s.warmup_epochs * steps_per_epoch),
      schedule=s.schedule,
      boundaries=tuple(int(e * steps_per_epoch) for e in s.decay_epochs),
      decay_rate=s.decay_rate, min_lr=s.min_lr, b1=s.b1,
      nesterov=bool(s.nesterov), beta2_min=s.beta2_min, beta2_max=s.beta2_max,
      no_decay=tuple(config.no_decay), frozen=tuple(s.get('frozen', ())),
      epoch_steps=steps_per_epoch if lr_update == 'epoch' else 0)


def _generative(config, stage: stages.Stage) -> dict:
  """The diffusion head's loss and sampler settings, validated."""
  g, smp = config.gendd, config.sampler
  try:  # Validate the schedules here, as configuration errors.
    diffusion.respaced_tables(g.noise_schedule, g.diffusion_steps,
                              str(smp.steps))
  except ValueError as e:
    raise ConfigError(f'gendd.noise_schedule / sampler.steps: {e}') from e
  kind = smp.get('kind', 'ancestral')
  if kind not in diffusion.SAMPLERS:
    raise ConfigError(f'sampler.kind={smp.kind!r}; expected one of '
                      f'{", ".join(diffusion.SAMPLERS)}')
  try:
    clip = gendd.parse_clip_x0(smp.clip_x0)
  except ValueError as e:
    raise ConfigError(f'sampler.{e}') from None
  for name in ('temperature', 'init_temperature'):
    if float(smp.get(name, 1.0)) < 0.0:
      raise ConfigError(f'sampler.{name}={smp[name]!r}: a noise scale is 0 '
                        'or more')
  published = bool(smp.get('also_eval_published', False))
  published_steps = str(smp.get('published_steps', smp.steps))
  if published and not published_steps.isdigit():
    raise ConfigError(
        f'sampler.also_eval_published measures the paper\'s sampler at '
        f'sampler.published_steps (default: sampler.steps), which must then '
        f"be a step count ('64'), not {published_steps!r}")
  init_temperature = float(smp.get('init_temperature', 1.0))
  published_cfg = float(smp.get('published_cfg_scale', smp.cfg_scale))
  # The configured sampler is the paper's: no second evaluation of it.
  as_published = (clip is None and kind == 'ancestral' and
                  float(smp.temperature) == 1.0 and init_temperature == 1.0
                  and str(smp.steps) == published_steps
                  and float(smp.cfg_scale) == published_cfg)
  target_norm(config)
  return dict(
      smooth=float(g.smooth) if stage.contracts else 0.0,
      probe=stage.has_probe,
      beta=float(g.beta),
      loss=gendd.LossSettings(g.token_dim, g.diffusion_batch_mul,
                              float(g.cond_drop_prob), bool(g.use_vb)),
      sample=gendd.SampleSettings(g.token_dim, smp.num_sampling,
                                  float(smp.cfg_scale),
                                  float(smp.temperature),
                                  None if clip == 'data' else clip,
                                  sampler=kind,
                                  init_temperature=init_temperature),
      noise_schedule=g.noise_schedule, diffusion_steps=g.diffusion_steps,
      sampling_steps=str(smp.steps),
      clip_to_data=clip == 'data',
      also_clipped=bool(smp.also_eval_clipped) and clip is None,
      also_published=published and not as_published,
      published_steps=published_steps, published_cfg_scale=published_cfg)


def step_settings(config, stage: str, steps_per_epoch: int,
                  precomputed: bool = False) -> StepSettings:
  """The static step settings of `stage`, validated."""
  record = stages.get(stage)
  kw = _generative(config, record) if record.generative else {}
  return StepSettings(stage=stage,
                      optim=optim_spec(config, stage, steps_per_epoch),
                      seed=config.seed,
                      accum_steps=int(config.grad_accum_steps),
                      kd_temperature=float(config.kd.temperature),
                      ce_weight=float(config.kd.ce_weight),
                      kd_weight=float(config.kd.kd_weight),
                      precomputed=precomputed, **kw)


def periodic_eval_settings(s: StepSettings) -> StepSettings:
  """`s` with the cheap evaluation of long runs: for a generative stage the
  probe and a one-step posterior mean (one draw, no clipped twin) instead of
  the configured sampler, which still runs at the end."""
  if s.sample is None:
    return s
  return dataclasses.replace(
      s, sample=s.sample._replace(sampler='posterior_mean', num_sampling=1),
      sampling_steps='1', also_clipped=False, also_published=False)


def create_mesh(config):
  """The mesh of `config.mesh`, with the batch sizes checked against it."""
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f'grad_accum_steps must be a positive integer, got '
                      f'{accum!r}')
  try:
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh,
                              'eval batch size')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  n = mesh.devices.size
  if config.data.batch_size % (n * accum):
    raise ConfigError(
        f'batch size {config.data.batch_size} is not divisible by '
        f'{n} devices x grad_accum_steps {accum}')
  return mesh


def precomputed_teacher(config, stage: str) -> bool:
  """Whether `stage` reads precomputed teacher outputs."""
  source = config.teacher.get('source', 'model')
  if source not in ('model', 'precomputed', 'random'):
    raise ConfigError(f"teacher.source={source!r}; expected 'model', "
                      "'precomputed' or 'random'")
  if source != 'precomputed' or not stages.get(stage).reads_precomputed:
    return False
  if not config.teacher.get('features'):
    raise ConfigError("teacher.source='precomputed' needs teacher.features="
                      '<output dir of gendd_jax.cli.precompute>')
  d = config.data
  mixing = [k for k in ('mixup', 'cutmix') if d.get(k, 0) > 0]
  if mixing:
    raise ConfigError(
        f'data.{" and data.".join(mixing)} mix the training images, but '
        'precomputed teacher features belong to the unmixed views: set '
        + ' '.join(f'--config.data.{k}=0' for k in mixing) + ', or compute '
        'the teacher every step (--config.teacher.source=model); label '
        'smoothing alone works with precomputed features')
  return True


def on_nonfinite(config) -> str:
  """What a non-finite step does: 'stop' (exit 3) or 'skip' (no update)."""
  mode = config.get('on_nonfinite', 'stop')
  if mode not in ON_NONFINITE:
    raise ConfigError(f"on_nonfinite={mode!r}; expected 'stop' or 'skip'")
  return mode


def target_norm(config) -> str:
  """`gendd.target_norm`: 'none' or 'standardize' (per-dimension targets)."""
  norm = config.gendd.target_norm
  if norm not in TARGET_NORMS:
    raise ConfigError(f"unknown gendd.target_norm {norm!r}; expected 'none' "
                      "or 'standardize'")
  return norm


def stage_data(config, stage: str):
  """`config.data` with the stage's own data settings applied: a non-zero
  `stages.<stage>.crop_scale` replaces `data.crop_scale` (the released
  ImageNet stage-1 crops from 8% of the area, stage-2 from 60%)."""
  scale = float(config.stages.get(stage, {}).get('crop_scale', 0.0) or 0.0)
  if not scale:
    return config.data
  d = copy.deepcopy(config.data)
  with d.unlocked():
    d.crop_scale = scale
  return d
