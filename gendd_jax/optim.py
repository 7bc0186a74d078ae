"""Learning-rate and Adam-beta2 schedules and the AdamW optimizer."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax


SCHEDULES = ('cosine', 'step', 'constant')
OPTIMIZERS = ('adamw', 'sgd')


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """Static optimizer settings (hashable, so built optimizers are reused).

  Attributes:
    lr: peak learning rate.
    weight_decay: decoupled weight decay for decayed parameters.
    total_steps: length of training.
    warmup_steps: linear warm-up from 0.
    schedule: 'cosine' (to `min_lr`), 'step' (times `decay_rate` at each of
      `boundaries`) or 'constant'.
    boundaries: step boundaries of the 'step' schedule.
    decay_rate: factor of the 'step' schedule.
    min_lr: end value of the cosine schedule.
    b1: Adam beta1.
    beta2_min, beta2_max: Adam beta2 rises from min to max by a half cosine
      over training (equal values: constant).
    no_decay: substrings of parameter paths that get no weight decay.
    name: 'adamw' or 'sgd' (momentum `b1`; weight decay added to the
      gradient before momentum, as torch's SGD).
    nesterov: Nesterov momentum for 'sgd'.
    frozen: parameter names (path components, e.g. 'fc') whose parameters
      are never updated, weight decay included.
    epoch_steps: 0 (the learning rate changes every step), or the steps per
      epoch: the learning rate then changes once per epoch, as the released
      code does (see `learning_rate`).
  """
  lr: float
  weight_decay: float
  total_steps: int
  warmup_steps: int = 0
  schedule: str = 'cosine'
  boundaries: tuple[int, ...] = ()
  decay_rate: float = 0.1
  min_lr: float = 0.0
  b1: float = 0.9
  beta2_min: float = 0.999
  beta2_max: float = 0.999
  no_decay: tuple[str, ...] = ()
  name: str = 'adamw'
  nesterov: bool = False
  frozen: tuple[str, ...] = ()
  epoch_steps: int = 0


def learning_rate(spec: OptimSpec) -> Callable[[jax.Array], jax.Array]:
  """`step -> lr`: linear warm-up, then the configured decay.

  Per step (`epoch_steps == 0`), the warm-up rises from 0 and the decay is a
  smooth function of the step. Per epoch, the value of epoch `e` (counted
  from 0) is the released code's:

    warm-up (e < W)   lr (e + 1) / W
    cosine            min_lr + (lr - min_lr) (1 + cos(pi (e + 1 - W) /
                      (E - W))) / 2
    step              warm-up only while e + 1 < W; then lr decay_rate^k,
                      k = the boundaries at or before e, and before the
                      first boundary the lr stays where the warm-up left
                      it, lr (W - 1) / W (the released CIFAR schedule
                      never resets it to lr)
    constant          lr
  """
  if spec.schedule not in SCHEDULES:
    raise ValueError(f'unknown lr schedule {spec.schedule!r}; expected '
                     "'cosine', 'step' or 'constant'")
  if spec.epoch_steps:
    return _per_epoch_learning_rate(spec)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = spec.lr * step / max(spec.warmup_steps, 1)
    if spec.schedule == 'cosine':
      span = max(spec.total_steps - spec.warmup_steps, 1)
      prog = jnp.clip((step - spec.warmup_steps) / span, 0.0, 1.0)
      after = spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (
          1.0 + jnp.cos(math.pi * prog))
    elif spec.schedule == 'step':
      passed = sum((step >= b).astype(jnp.float32) for b in spec.boundaries)
      after = spec.lr * spec.decay_rate ** passed
    else:
      after = jnp.asarray(spec.lr, jnp.float32)
    return jnp.where(step < spec.warmup_steps, warm, after)
  return fn


def _per_epoch_learning_rate(spec: OptimSpec
                             ) -> Callable[[jax.Array], jax.Array]:
  """The released code's once-per-epoch schedules (see `learning_rate`)."""
  per = spec.epoch_steps
  w = spec.warmup_steps / per
  total = spec.total_steps / per
  milestones = [b / per for b in spec.boundaries]

  def fn(step):
    e = jnp.floor(jnp.asarray(step, jnp.float32) / per)
    warm = spec.lr * (e + 1.0) / max(w, 1e-12)
    if spec.schedule == 'cosine':
      prog = jnp.clip((e + 1.0 - w) / max(total - w, 1e-12), 0.0, 1.0)
      after = spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (
          1.0 + jnp.cos(math.pi * prog))
    elif spec.schedule == 'step':
      passed = sum((e >= m).astype(jnp.float32) for m in milestones)
      plateau = spec.lr * (w - 1.0) / w if w >= 1 else spec.lr
      after = jnp.where(passed > 0, spec.lr * spec.decay_rate ** passed,
                        plateau)
    else:
      after = jnp.asarray(spec.lr, jnp.float32)
    in_warmup = e + 1.0 < w if spec.schedule == 'step' else e < w
    return jnp.where(in_warmup, warm, after)
  return fn


def beta2(spec: OptimSpec) -> Callable[[jax.Array], jax.Array]:
  """`step -> beta2`: half-cosine ramp from `beta2_min` to `beta2_max`."""
  def fn(step):
    prog = jnp.asarray(step, jnp.float32) / max(spec.total_steps - 1, 1)
    prog = jnp.clip(prog, 0.0, 1.0)
    return spec.beta2_max - 0.5 * (spec.beta2_max - spec.beta2_min) * (
        1.0 + jnp.cos(math.pi * prog))
  return fn


def decay_mask(no_decay: tuple[str, ...]):
  """Pytree mask: True where a parameter's path has none of `no_decay`."""
  def fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in jax.tree_util.keystr(path)
                                for s in no_decay), params)
  return fn


def frozen_mask(frozen: tuple[str, ...]):
  """Pytree mask: True where a parameter's path has a component named in
  `frozen`."""
  names = set(frozen)

  def fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, 'key', getattr(k, 'name', None))
                            in names for k in path), params)
  return fn


@functools.lru_cache(maxsize=None)
def create_optimizer(spec: OptimSpec) -> optax.GradientTransformation:
  """The optimizer for `spec`; the same object for equal specs."""
  if spec.name == 'adamw':
    opt = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
        learning_rate=learning_rate(spec), b1=spec.b1, b2=beta2(spec),
        weight_decay=spec.weight_decay, mask=decay_mask(spec.no_decay))
  elif spec.name == 'sgd':
    opt = optax.chain(
        optax.add_decayed_weights(spec.weight_decay,
                                  mask=decay_mask(spec.no_decay)),
        optax.inject_hyperparams(optax.sgd)(
            learning_rate=learning_rate(spec), momentum=spec.b1,
            nesterov=spec.nesterov))
  else:
    raise ValueError(f"unknown optimizer {spec.name!r}; expected 'adamw' or "
                     "'sgd'")
  if spec.frozen:
    opt = optax.chain(opt, optax.masked(optax.set_to_zero(),
                                        frozen_mask(spec.frozen)))
  return opt
