"""The GenDD objective and inference as pure functions.

The student's normalised feature `z` conditions a diffusion head that learns
to generate the teacher's feature token by token. `head` is any object with
`embed_time(t)`, `embed_time_table(timesteps)`, `embed_cond(z)`, `pos_table()`,
`trunk(x, y)`, `modulations(y)` and `trunk_modulated(x, mods)` (see
`models.denoiser.DenoiserMLP`); it is passed in, so this module imports no
model code and is testable on its own.

Shapes: `B` images, `D` teacher width, `C = token_dim`, `K = D / C` tokens,
`M = diffusion_batch_mul` copies, `S` samples per image.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gendd_jax import diffusion


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------


def split_tokens(feature: jax.Array, token_dim: int) -> jax.Array:
  """`[B, D] -> [B, D / C, C]` contiguous chunks."""
  d = feature.shape[-1]
  if d % token_dim:
    raise ValueError(f'token_dim {token_dim} does not divide the teacher '
                     f'feature width {d}')
  return feature.reshape(feature.shape[:-1] + (d // token_dim, token_dim))


def merge_tokens(tokens: jax.Array) -> jax.Array:
  """`[..., K, C] -> [..., K * C]`."""
  return tokens.reshape(tokens.shape[:-2] + (-1,))


def contract_target(feature: jax.Array, labels: jax.Array | None,
                    w_cls: jax.Array, smooth: float,
                    label_mask: jax.Array | None = None) -> jax.Array:
  """Distribution contraction `(1 - s) f + s (y @ W)`.

  Args:
    feature: `[B, D]` teacher features.
    labels: `[B]` class ids, `[B, N]` soft labels, or None (unsupervised: the
      target is the teacher feature and no label is touched).
    w_cls: `[N, D]` frozen teacher classifier rows.
    smooth: contraction strength `s`.
    label_mask: optional `[B]`; rows without a usable label keep `s = 0`.

  Returns:
    `[B, D]` generation targets.
  """
  if labels is None or smooth == 0.0:
    return feature
  if labels.ndim == 1:
    centers = w_cls[labels]
  else:
    centers = labels.astype(w_cls.dtype) @ w_cls
  s = jnp.asarray(smooth, feature.dtype)
  if label_mask is not None:
    s = s * label_mask.astype(feature.dtype)[:, None]
  return (1.0 - s) * feature + s * centers


def mix_features(key: jax.Array, z: jax.Array, target: jax.Array,
                 beta: float, draws: dict[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """One Beta(beta, beta) draw and one permutation mix `z` and `target`.

  `draws` (`lam` scalar, `perm` `[B]`), when given, replaces the draws
  from `key`: a recorded step replays exactly (the parity tests).
  """
  if beta <= 0:
    return z, target
  k_lam, k_perm = jax.random.split(key)
  if draws is None:
    lam = jax.random.beta(k_lam, beta, beta).astype(z.dtype)
    perm = jax.random.permutation(k_perm, z.shape[0])
  else:
    lam, perm = jnp.asarray(draws['lam'], z.dtype), draws['perm']
  return (lam * z + (1 - lam) * z[perm],
          lam * target + (1 - lam) * target[perm])


# ---------------------------------------------------------------------------
# Training loss.
# ---------------------------------------------------------------------------


class LossSettings(NamedTuple):
  token_dim: int
  diffusion_batch_mul: int
  cond_drop_prob: float
  use_vb: bool = True


def diffusion_loss(head: Any, schedule: diffusion.Schedule, key: jax.Array,
                   z: jax.Array, target: jax.Array, settings: LossSettings,
                   draws: dict[str, jax.Array] | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Split-token diffusion loss, averaged over every token row.

  The `[B, K]` token grid is tiled `M` times as whole blocks; each row draws
  its own timestep, noise and condition-dropout flag (dropped rows see a
  zero `z`, whose embedding is the layer's bias). Work that depends only on
  the image (`embed_cond`) or only on the timestep (`embed_time`, as a table
  when there are more rows than timesteps) is done once.

  `draws`, when given, replaces the draws from `key` (a recorded step
  replays exactly): `t` `[M, B, K]` timesteps, `noise` `[M, B, K, C]`, and
  `drop` `[M, B, K]` condition-dropout flags.

  Returns:
    `(loss, aux)` with aux holding the mean `mse` and `vb`.
  """
  tokens = split_tokens(target, settings.token_dim)  # [B, K, C]
  m = settings.diffusion_batch_mul
  b, k, c = tokens.shape
  rows = (m, b, k)
  n = m * b * k
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  if draws is None:
    t = jax.random.randint(k_t, rows, 0, schedule.num_steps)
    noise = jax.random.normal(k_noise, rows + (c,), tokens.dtype)
    drop = (jax.random.bernoulli(k_drop, settings.cond_drop_prob, rows)
            if settings.cond_drop_prob > 0 else None)
  else:
    t, drop = draws['t'].reshape(rows), draws['drop'].reshape(rows)
    noise = draws['noise'].reshape(rows + (c,)).astype(tokens.dtype)

  c_emb = head.embed_cond(z)[None, :, None, :]  # [1, B, 1, W]
  c_null = head.embed_cond(jnp.zeros_like(z[:1]))  # [1, W]
  if drop is not None:
    c_emb = jnp.where(drop[..., None], c_null, c_emb)
  y = c_emb + head.pos_table()  # [M, B, K, W] (or [1, B, K, W]).
  # Rows are flattened to 2-D: plain GEMMs are markedly faster on CPU than
  # the same contractions over [M, B, K, ...] operands, backward included.
  y = jnp.broadcast_to(y, rows + y.shape[-1:]).reshape(n, -1)
  x0 = jnp.broadcast_to(tokens[None], rows + (c,)).reshape(n, c)
  t = t.reshape(n)
  noise = noise.reshape(n, c)
  if n > schedule.timestep_map.shape[0]:
    # Embed each distinct timestep once, then gather per row.
    table = head.embed_time_table(schedule.timestep_map)
    t_emb = table[t]
  else:
    t_emb = head.embed_time(schedule.timestep_map[t])

  def model_fn(xt, _):
    return head.trunk(xt, t_emb + y)

  terms = diffusion.training_losses(schedule, model_fn, x0, t, noise,
                                    use_vb=settings.use_vb)
  aux = dict(mse=jnp.mean(terms['mse']), vb=jnp.mean(terms['vb']))
  return jnp.mean(terms['loss']), aux


# ---------------------------------------------------------------------------
# Inference.
# ---------------------------------------------------------------------------


class SampleSettings(NamedTuple):
  token_dim: int
  num_sampling: int = 1
  cfg_scale: float = 2.0
  temperature: float = 1.0
  # A number, a traced scalar (a data-derived bound), a
  # `diffusion.Threshold` (dynamic thresholding) or None (no clipping).
  clip_x0: diffusion.X0Clip = None
  # 'ancestral' (the paper's), 'ddim' (eta 0), 'dpmpp_2m' (DPM-Solver++(2M))
  # or 'posterior_mean' (one network call at the schedule's noisiest step;
  # see `sampling_schedule`).
  sampler: str = 'ancestral'
  # Scale of the initial noise x_T (1: the prior, as the reference). With
  # `temperature` 0 as well, 0 makes sampling deterministic: every draw of
  # an image is the same feature, reached from x_T = 0 with no noise
  # injected (the mode-seeking limit; docs/samplers.md).
  init_temperature: float = 1.0


# `clip_x0` names of dynamic thresholding: rescale to the data bound, or
# only clip at the percentile (see `diffusion.Threshold`).
DYNAMIC = {'dynamic': True, 'dynamic_clip': False}


def parse_clip_x0(value: Any) -> float | str | diffusion.Threshold | None:
  """A `clip_x0` setting: None for 'none' (or ''), 'data' (the training
  targets' range, known only once data is seen), a number, or dynamic
  thresholding: 'dynamic' (Imagen's: clip at the per-token 99.5th
  percentile of |x0| when it exceeds the data bound, then rescale to the
  bound), 'dynamic_clip' (clip there, no rescaling), each optionally with
  the percentile, 'dynamic:99'. A `Threshold`'s bound is 1 here;
  `with_bound` sets the data's.

  Raises:
    ValueError: anything else.
  """
  text = str(value)
  if text in ('none', ''):
    return None
  if text == 'data':
    return 'data'
  name, sep, pct = text.partition(':')
  if name in DYNAMIC:
    try:
      p = float(pct) if sep else diffusion.Threshold().percentile
    except ValueError:
      p = -1.0
    if not 0.0 < p <= 100.0:
      raise ValueError(f'clip_x0={value!r}: the percentile after {name}: '
                       'must be a number in (0, 100]')
    return diffusion.Threshold(p, DYNAMIC[name])
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"clip_x0 must be 'none', 'data', a number, "
                     f"'dynamic[:P]' or 'dynamic_clip[:P]', got "
                     f'{value!r}') from None


def with_bound(clip: Any, bound: Any) -> Any:
  """`clip` with a dynamic threshold's bound set to the data's (`bound`,
  e.g. `Teacher.clip_bound`); other settings unchanged."""
  if isinstance(clip, diffusion.Threshold) and bound is not None:
    return clip._replace(bound=bound)
  return clip


def sampling_schedule(noise_schedule: str, diffusion_steps: int,
                      steps: str, sampler: str = 'ancestral'
                      ) -> diffusion.Schedule:
  """The respaced schedule a sampler runs on.

  Respacing to N steps keeps both ends of the schedule for N >= 2, but only
  t = 0 for N = 1 (the reference's spacing rule), so a one-step estimate
  from noise needs the full schedule: 'posterior_mean' always uses it (its
  single network call is at t = T - 1, whatever `steps` says). 'trailingN'
  always keeps t = T - 1 (`diffusion.trailing_steps`).

  Raises:
    ValueError: an unknown sampler or a respacing the schedule cannot take.
  """
  if sampler not in diffusion.SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; expected one of '
                     f'{", ".join(diffusion.SAMPLERS)}')
  if sampler == 'posterior_mean':
    steps = ''
  return diffusion.create_schedule(noise_schedule, diffusion_steps, steps)


# Samplers that call the network once at every step of their schedule; for
# them the unconditional branch's modulations are tabulated before the loop.
_EVERY_STEP_SAMPLERS = ('ancestral', 'ddim', 'dpmpp_2m')
# Largest such table (bytes); beyond it they are computed in each step.
_MAX_TABLE_BYTES = 1 << 28


def sample_features(head: Any, schedule: diffusion.Schedule, key: jax.Array,
                    z: jax.Array, settings: SampleSettings) -> jax.Array:
  """Samples teacher-space features `[B, D]` for conditions `z: [B, Dz]`.

  All `S x B x K` tokens go through one `lax.scan` over the respaced
  schedule; the `S` draws are averaged in feature space. With guidance the
  unconditional branch uses the zero condition and the same tokens, so both
  branches share the noise.

  The trunk's adaLN modulations (most of its multiply-adds) depend only on
  the conditioning, so each is computed once per distinct conditioning and
  broadcast over the tokens that share it: per (step, image, token) for the
  conditional branch (shared by the `S` draws) and per (step, token) for the
  unconditional one. For samplers that visit every step the latter, and the
  timestep embeddings, are tabulated for the whole schedule before the loop
  (one large matrix product instead of one small one per step).
  """
  pos = head.pos_table()  # [K, W]
  num_tokens = pos.shape[0]
  y_cond = head.embed_cond(z)[:, None, :] + pos  # [B, K, W]
  y_null = head.embed_cond(jnp.zeros_like(z[:1])) + pos  # [K, W]
  shape = (settings.num_sampling, z.shape[0], num_tokens, settings.token_dim)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, shape, z.dtype)
  init = settings.init_temperature
  if not (isinstance(init, (int, float)) and init == 1.0):  # Static or traced.
    x_T = x_T * init

  steps = schedule.timestep_map  # Ascending network timesteps.
  table_bytes = steps.shape[0] * sum(
      m.size * m.dtype.itemsize
      for m in jax.tree.leaves(jax.eval_shape(head.modulations, y_null)))
  if (settings.sampler in _EVERY_STEP_SAMPLERS and
      table_bytes <= _MAX_TABLE_BYTES):
    t_table = head.embed_time_table(steps)  # [T, W]
    null_table = head.modulations(t_table[:, None, :] + y_null)  # [T, K, W]

    def t_emb(t_net):
      return t_table[jnp.searchsorted(steps, t_net)]

    def null_mods(t_net):
      i = jnp.searchsorted(steps, t_net)
      return jax.tree.map(lambda m: m[i], null_table)
  else:
    t_emb = head.embed_time

    def null_mods(t_net):
      return head.modulations(t_emb(t_net) + y_null)

  def cond_fn(x, t_net):
    return head.trunk_modulated(x, head.modulations(t_emb(t_net) + y_cond))

  def uncond_fn(x, t_net):
    return head.trunk_modulated(x, null_mods(t_net))

  model_fn = diffusion.cfg_model_fn(cond_fn, uncond_fn, settings.cfg_scale)
  tokens = diffusion.sample_loop(
      settings.sampler, schedule, model_fn, x_T, key=k_loop,
      temperature=settings.temperature, clip_x0=settings.clip_x0)
  return jnp.mean(merge_tokens(tokens), axis=0)


def sample_teacher_features(head: Any, schedule: diffusion.Schedule,
                            key: jax.Array, z: jax.Array,
                            settings: SampleSettings,
                            stats: dict[str, jax.Array] | None = None
                            ) -> jax.Array:
  """`sample_features`, de-standardised into the teacher's feature space when
  the head was trained on standardised targets (`stats`: `mean`, `std`)."""
  feat = sample_features(head, schedule, key, z, settings)
  if stats is not None:
    feat = feat * stats['std'] + stats['mean']
  return feat


def sampled_logits(head: Any, schedule: diffusion.Schedule, key: jax.Array,
                   z: jax.Array, settings: SampleSettings, weight: jax.Array,
                   bias: jax.Array, stats: dict[str, jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Sample -> de-standardise -> classify with the teacher classifier
  (`weight: [C, D]`, `bias: [C]`): `(logits [B, C], features [B, D])`."""
  feat = sample_teacher_features(head, schedule, key, z, settings, stats)
  return feat @ weight.T + bias, feat


# ---------------------------------------------------------------------------
# Classification losses shared by the baselines.
# ---------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """Mean (soft-target) cross-entropy over rows with `mask` (all if None)."""
  logp = jax.nn.log_softmax(logits)
  if labels.ndim == 1:
    nll = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
  else:
    nll = -jnp.sum(labels * logp, -1)
  if mask is None:
    return jnp.mean(nll)
  mask = mask.astype(nll.dtype)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float) -> jax.Array:
  """Hinton's `T^2 * KL(softmax(t / T) || softmax(s / T))`, batch mean."""
  p_t = jax.nn.softmax(teacher_logits / temperature)
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature)
  log_p_s = jax.nn.log_softmax(student_logits / temperature)
  kl = jnp.sum(p_t * (log_p_t - log_p_s), -1)
  return jnp.mean(kl) * temperature ** 2
