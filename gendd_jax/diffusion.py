"""Gaussian diffusion over feature tokens: schedules, losses and samplers.

Pure array functions (numpy for the schedule tables, jax.numpy for everything
that runs inside `jit`). No Flax: the denoiser enters as a callable.

Conventions follow the DDPM / improved-DDPM line used by GenDD:
  * epsilon prediction with a *learned-range* variance: the network returns
    `[eps | v]` with `2 * C` channels and `log var = f * log(beta_t) +
    (1 - f) * log(posterior_var_clipped_t)`, `f = (v + 1) / 2` (not clamped);
  * the training loss per row is `mean_C (eps - eps_hat)^2` plus the
    variational-bound term in bits, computed with `eps_hat` frozen;
  * respaced schedules keep a subset of the 1000 steps and feed the *original*
    timestep to the network through `timestep_map`.

Shapes: `x: [N, C]` (any leading dims work), `t: [N]` integer indices into the
(respaced) schedule. Schedule constants are built in float64 and cast to
float32 once, which equals gathering in float64 and casting afterwards.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# Schedules (numpy, float64).
# ---------------------------------------------------------------------------


def beta_schedule(name: str, num_steps: int) -> np.ndarray:
  """Betas of a named noise schedule, float64 `[num_steps]`.

  Args:
    name: 'cosine' (improved DDPM, offset 0.008, betas capped at 0.999) or
      'linear' (DDPM's 1e-4..2e-2, rescaled to `num_steps`).
    num_steps: number of diffusion steps.

  Returns:
    The betas.
  """
  if name == 'cosine':
    def alpha_bar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps),
            0.999)
        for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float64)
  if name == 'linear':
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  raise ValueError(
      f"unknown noise schedule {name!r}; expected 'cosine' or 'linear'")


def space_timesteps(num_steps: int, spacing: str | int | Sequence[int]
                    ) -> list[int]:
  """Timesteps of the base process kept by a respacing, in ascending order.

  Args:
    num_steps: length of the base process (e.g. 1000).
    spacing: '' / None (keep all), 'N' or 'a,b,c' (steps per equal section,
      evenly strided with Python's round-half-even, as the reference does),
      'ddimN' (fixed integer stride) or 'trailingN' (see `trailing_steps`).

  Returns:
    Sorted list of kept timesteps.
  """
  if spacing in (None, ''):
    return list(range(num_steps))
  if isinstance(spacing, int):
    counts = [spacing]
  elif isinstance(spacing, str):
    if spacing.startswith('trailing'):
      return trailing_steps(num_steps, _count(spacing, 'trailing'))
    if spacing.startswith('ddim'):
      want = _count(spacing, 'ddim')
      for stride in range(1, num_steps):
        if len(range(0, num_steps, stride)) == want:
          return list(range(0, num_steps, stride))
      raise ValueError(f'cannot take exactly {want} of {num_steps} steps with '
                       'an integer stride')
    counts = [int(p) for p in spacing.split(',')]
  else:
    counts = [int(p) for p in spacing]
  base, extra = divmod(num_steps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = base + (1 if i < extra else 0)
    if count < 1 or size < count:
      raise ValueError(f'cannot divide a section of {size} steps into {count}')
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    pos = 0.0
    for _ in range(count):
      kept.append(start + round(pos))
      pos += stride
    start += size
  return sorted(set(kept))


def _count(spacing: str, prefix: str) -> int:
  try:
    return int(spacing[len(prefix):])
  except ValueError:
    raise ValueError(f'{prefix} spacing needs a step count, e.g. '
                     f"'{prefix}8', got {spacing!r}") from None


def trailing_steps(num_steps: int, count: int) -> list[int]:
  """'Trailing' respacing (Lin et al., 2024, table 2): `count` steps evenly
  spaced down from the noisiest one, `round(num_steps - k * num_steps /
  count) - 1` for k = 0..count-1.

  It always keeps t = num_steps - 1, so sampling starts where x_T ~ N(0, I)
  is the right marginal; the reference's rule ('N') keeps t = 0 and drops the
  noisiest steps at low counts (one step keeps only t = 0). The least noisy
  kept step is num_steps / count - 1, whose x0 estimate the samplers return.

  Raises:
    ValueError: `count` outside [1, num_steps].
  """
  if not 1 <= count <= num_steps:
    raise ValueError(f'cannot take {count} trailing steps of {num_steps}')
  stride = num_steps / count
  return sorted(int(round(num_steps - k * stride)) - 1 for k in range(count))


def schedule_tables(betas: np.ndarray, timestep_map: Sequence[int] | None = None
                    ) -> dict[str, np.ndarray]:
  """All float64 constants of a Gaussian diffusion with the given betas."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError('betas must be a 1-D array in (0, 1]')
  n = betas.shape[0]
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  if n > 1:
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  else:  # A single step has no posterior; fall back to beta.
    post_logvar = np.log(betas)
  return dict(
      betas=betas,
      log_betas=np.log(betas),
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_logvar,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      timestep_map=np.asarray(
          range(n) if timestep_map is None else timestep_map, dtype=np.int64),
  )


def respaced_tables(name: str = 'cosine', num_steps: int = 1000,
                    spacing: str | int | Sequence[int] | None = ''
                    ) -> dict[str, np.ndarray]:
  """float64 tables of a (possibly respaced) schedule.

  The kept steps' betas are re-derived as `1 - abar_k / abar_{k-1}` from the
  base process, so the respaced chain has the same marginals at kept steps.
  """
  base = schedule_tables(beta_schedule(name, num_steps))
  kept = space_timesteps(num_steps, spacing)
  ac = base['alphas_cumprod']
  new_betas, last = [], 1.0
  for i in kept:
    new_betas.append(1.0 - ac[i] / last)
    last = ac[i]
  return schedule_tables(np.asarray(new_betas), timestep_map=kept)


class Schedule(NamedTuple):
  """float32 schedule constants (a pytree, so it can pass through `jit`)."""
  betas: jax.Array
  log_betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timestep_map: jax.Array  # int32 [T]: respaced index -> network timestep.

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def create_schedule(name: str = 'cosine', num_steps: int = 1000,
                    spacing: str | int | Sequence[int] | None = ''
                    ) -> Schedule:
  """float32 `Schedule` for training (`spacing=''`) or sampling ('64')."""
  tables = respaced_tables(name, num_steps, spacing)
  fields = {k: np.asarray(v, dtype=np.float32) for k, v in tables.items()
            if k != 'timestep_map'}
  return Schedule(**{k: jnp.asarray(v) for k, v in fields.items()},
                  timestep_map=jnp.asarray(tables['timestep_map'], jnp.int32))


def _at(table: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """`table[t]` broadcast against `like` ([N] -> [N, 1, ...])."""
  v = table[t]
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


# ---------------------------------------------------------------------------
# Forward process and posterior.
# ---------------------------------------------------------------------------


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array
             ) -> jax.Array:
  """Draw `x_t ~ q(x_t | x_0)` with the given standard-normal `noise`."""
  return (_at(s.sqrt_alphas_cumprod, t, x0) * x0 +
          _at(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior(s: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Mean and clipped log-variance of `q(x_{t-1} | x_t, x_0)`."""
  mean = (_at(s.posterior_mean_coef1, t, xt) * x0 +
          _at(s.posterior_mean_coef2, t, xt) * xt)
  logvar = _at(s.posterior_log_variance_clipped, t, xt) + jnp.zeros_like(xt)
  return mean, logvar


def predict_x0_from_eps(s: Schedule, xt: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
  return (_at(s.sqrt_recip_alphas_cumprod, t, xt) * xt -
          _at(s.sqrt_recipm1_alphas_cumprod, t, xt) * eps)


def predict_eps_from_x0(s: Schedule, xt: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
  return ((_at(s.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) /
          _at(s.sqrt_recipm1_alphas_cumprod, t, xt))


def learned_range_logvar(s: Schedule, v: jax.Array, t: jax.Array
                         ) -> jax.Array:
  """Log-variance interpolated by `v` in [-1, 1] (not clamped)."""
  frac = (v + 1.0) / 2.0
  return (frac * _at(s.log_betas, t, v) +
          (1.0 - frac) * _at(s.posterior_log_variance_clipped, t, v))


class Threshold(NamedTuple):
  """Dynamic thresholding of the x0 estimate (Saharia et al., 2022, Imagen).

  Per row (the last axis: one token), `s = max(bound, q)` with `q` the
  `percentile` of `|x0|`; then `x0` is clipped to `[-s, s]` and, with
  `rescale`, multiplied by `bound / s`. Imagen's data lie in [-1, 1]
  (`bound = 1`); features are unbounded, so `bound` is their own scale (the
  training targets' largest magnitude). Rescaling shrinks a row whose
  estimate has blown up back to the data's range but also scales down its
  valid entries; `rescale=False` only clips at the percentile, which keeps a
  row's scale (a blown-up row stays blown up) and removes its outliers.
  """
  percentile: float = 99.5
  rescale: bool = True
  bound: float | jax.Array = 1.0


# A static float, a traced scalar (data-derived bound), a `Threshold` or None.
X0Clip = float | jax.Array | Threshold | None


def threshold_x0(x0: jax.Array, clip: X0Clip) -> jax.Array:
  """`x0` clipped to `[-clip, clip]` for a number, dynamically thresholded
  for a `Threshold`, unchanged for None. `x0: [..., C]`."""
  if clip is None:
    return x0
  if not isinstance(clip, Threshold):
    return jnp.clip(x0, -clip, clip)
  q = jnp.percentile(jnp.abs(x0), clip.percentile, axis=-1, keepdims=True)
  bound = jnp.asarray(clip.bound, x0.dtype)
  scale = jnp.maximum(q, bound)
  out = jnp.clip(x0, -scale, scale)
  return out * (bound / scale) if clip.rescale else out


def p_mean_variance(s: Schedule, model_out: jax.Array, xt: jax.Array,
                    t: jax.Array, clip_x0: X0Clip = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Model mean, log-variance and x0 estimate of `p(x_{t-1} | x_t)`.

  Args:
    s: schedule.
    model_out: `[N, 2C]` network output `[eps | v]`.
    xt: `[N, C]`.
    t: `[N]` indices into `s`.
    clip_x0: if set, clip the x0 estimate to `[-clip_x0, clip_x0]`, or
      threshold it (`Threshold`); the reference never clips (see the
      config's `sampler.clip_x0`).

  Returns:
    `(mean, log_var, pred_x0)`, each `[N, C]`.
  """
  c = xt.shape[-1]
  eps, v = model_out[..., :c], model_out[..., c:]
  logvar = learned_range_logvar(s, v, t)
  pred_x0 = predict_x0_from_eps(s, xt, t, eps)
  pred_x0 = threshold_x0(pred_x0, clip_x0)
  mean, _ = q_posterior(s, pred_x0, xt, t)
  return mean, logvar, pred_x0


# ---------------------------------------------------------------------------
# Loss terms.
# ---------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
  """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by ADM."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) *
                               (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood (nats) of `x` under a Gaussian discretised to 1/255 bins.

  Values beyond +-0.999 take the open-ended tail bin, as for 8-bit images in
  [-1, 1]; GenDD applies it unchanged to feature tokens at t = 0.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_bits(s: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array,
            model_out: jax.Array) -> jax.Array:
  """Variational-bound term per row, in bits: `[N]`.

  KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) averaged over channels for t > 0,
  the discretised decoder NLL at t = 0.
  """
  true_mean, true_logvar = q_posterior(s, x0, xt, t)
  mean, logvar, _ = p_mean_variance(s, model_out, xt, t)
  kl = jnp.mean(normal_kl(true_mean, true_logvar, mean, logvar), -1) / LN2
  nll = -jnp.mean(discretized_gaussian_log_likelihood(
      x0, mean, 0.5 * logvar), -1) / LN2
  return jnp.where(t == 0, nll, kl)


def training_losses(s: Schedule, model_fn: Callable[[jax.Array, jax.Array],
                                                     jax.Array],
                    x0: jax.Array, t: jax.Array, noise: jax.Array,
                    use_vb: bool = True) -> dict[str, jax.Array]:
  """Per-row training loss: eps-MSE (+ VB with the eps half frozen).

  Args:
    s: training schedule.
    model_fn: `(x_t [N, C], network timestep [N]) -> [N, 2C]`.
    x0: `[N, C]` clean tokens.
    t: `[N]` schedule indices.
    noise: `[N, C]` standard normal.
    use_vb: add the variational-bound term (the reference does).

  Returns:
    dict with `loss`, `mse`, `vb` (each `[N]`) and `x_t`, `model_out`.
  """
  xt = q_sample(s, x0, t, noise)
  out = model_fn(xt, s.timestep_map[t])
  c = x0.shape[-1]
  eps = out[..., :c]
  mse = jnp.mean(jnp.square(noise - eps), -1)
  if use_vb:
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., c:]], -1)
    vb = vb_bits(s, x0, xt, t, frozen)
  else:
    vb = jnp.zeros_like(mse)
  return dict(loss=mse + vb, mse=mse, vb=vb, x_t=xt, model_out=out)


# ---------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------


def p_sample(s: Schedule, model_out: jax.Array, x: jax.Array, t: jax.Array,
             noise: jax.Array, temperature: float | jax.Array = 1.0,
             clip_x0: X0Clip = None) -> tuple[jax.Array, jax.Array]:
  """One ancestral step `x_t -> x_{t-1}`; no noise is added at t == 0.

  `temperature` scales only the injected noise.

  Returns:
    `(x_{t-1}, pred_x0)`.
  """
  mean, logvar, pred_x0 = p_mean_variance(s, model_out, x, t, clip_x0)
  nonzero = (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - t.ndim))
  return mean + nonzero * jnp.exp(0.5 * logvar) * noise * temperature, pred_x0


def p_sample_loop(s: Schedule,
                  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                  x_T: jax.Array,
                  key: jax.Array | None = None,
                  step_noise: jax.Array | None = None,
                  temperature: float | jax.Array = 1.0,
                  clip_x0: X0Clip = None,
                  return_trajectory: bool = False):
  """Ancestral sampling from `x_T` through every step of `s`, as one scan.

  Args:
    s: (respaced) sampling schedule with `T` steps.
    model_fn: `(x [..., C], network timestep (scalar int)) -> [..., 2C]`. All
      rows share the timestep, so the network can embed it once.
    x_T: initial noise `[..., C]`.
    key: PRNG key for the per-step noise (step k uses `fold_in(key, k)`).
    step_noise: alternatively, the per-step noise `[T, ..., C]` (step k
      processes schedule index `T-1-k`); used to replay recorded draws.
    temperature: scales the injected noise.
    clip_x0: optional x0 clipping (see `p_mean_variance`).
    return_trajectory: also return the states `[T+1, ...]` and x0 estimates
      `[T, ...]`.

  Returns:
    The samples `[..., C]` (and the trajectory if asked).
  """
  if step_noise is None and key is None:
    raise ValueError('p_sample_loop needs `key` or `step_noise`')

  def update(out, x, t, noise):
    return p_sample(s, out, x, t, noise, temperature, clip_x0)

  return _scan_steps(s, model_fn, x_T, update, key=key,
                     step_noise=step_noise, draws_noise=True,
                     return_trajectory=return_trajectory)


def _scan_steps(s: Schedule,
                model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                x_T: jax.Array,
                update: Callable[..., tuple[jax.Array, jax.Array]],
                *,
                key: jax.Array | None,
                step_noise: jax.Array | None,
                draws_noise: bool,
                return_trajectory: bool):
  """The scan shared by the iterative samplers.

  Step k processes schedule index `T-1-k`: it calls the network at
  `s.timestep_map[T-1-k]` and then `update(out, x, t, noise) ->
  (x_new, pred_x0)`. With `draws_noise`, `noise` is `step_noise[k]` or
  `normal(fold_in(key, k))`; otherwise None.
  """
  num = s.num_steps
  steps = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
  xs = (steps, jnp.arange(num) if step_noise is None else step_noise)

  def body(x, inp):
    i, extra = inp
    if not draws_noise:
      noise = None
    elif step_noise is None:
      noise = jax.random.normal(jax.random.fold_in(key, extra), x.shape,
                                x.dtype)
    else:
      noise = extra
    out = model_fn(x, s.timestep_map[i])
    t = jnp.broadcast_to(i, x.shape[:-1])
    x_new, pred_x0 = update(out, x, t, noise)
    return x_new, ((x, pred_x0) if return_trajectory else None)

  x_0, traj = jax.lax.scan(body, x_T, xs)
  if return_trajectory:
    states = jnp.concatenate([traj[0], x_0[None]], 0)
    return x_0, states, traj[1]
  return x_0


def cfg_model_fn(cond_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 uncond_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 scale: float | jax.Array):
  """Classifier-free guidance on the eps half; the variance half is cond's.

  Both branches see the same `x`, so they also share the sampler's noise.
  """
  def fn(x, t):
    cond = cond_fn(x, t)
    c = x.shape[-1]
    if isinstance(scale, (int, float)) and scale == 1.0:
      return cond
    uncond = uncond_fn(x, t)
    eps = uncond[..., :c] + scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([eps, cond[..., c:]], -1)
  return fn


# ---------------------------------------------------------------------------
# Few-step samplers: DDIM, DPM-Solver++(2M) and the one-step posterior mean.
# ---------------------------------------------------------------------------

SAMPLERS = ('ancestral', 'ddim', 'dpmpp_2m', 'posterior_mean')


def _is_static_zero(value) -> bool:
  return isinstance(value, (int, float)) and value == 0


def ddim_step(s: Schedule, model_out: jax.Array, x: jax.Array, t: jax.Array,
              noise: jax.Array | None = None,
              eta: float | jax.Array = 0.0,
              temperature: float | jax.Array = 1.0,
              clip_x0: X0Clip = None) -> tuple[jax.Array, jax.Array]:
  """One DDIM update from schedule index `t` to index `t - 1`.

  With `a = alphas_cumprod[t]` and `a' = alphas_cumprod_prev[t]` (the
  cumulative product at the next-lower retained step; 1 at index 0) the
  update of Song et al. (2021), eq. 12, is

    x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma * noise,
    sigma^2 = eta^2 (1 - a') / (1 - a) (1 - a / a') = eta^2 posterior_var[t].

  `eps` is the network's eps half; the variance half is not used. With
  `clip_x0`, x0 is clipped and eps re-derived from the clipped x0 so that
  both terms stay consistent (as in ADM's DDIM). At index 0, `a' = 1` makes
  the update return x0 exactly, with no noise for any `eta`.

  The eps coefficient is evaluated as

    1 - a' - sigma^2 = (1 - a') / (1 - a) * ((1 - eta^2) beta + a (1 - a') / a')

  (every term >= 0 for eta <= 1), with `(1 - a') / (1 - a)` taken as
  `posterior_var / beta`. The textbook form cancels catastrophically when
  `a` is tiny: with the cosine schedule and 8 kept steps at eta = 1 it rounds
  to -6e-8 at t = 999 in float32 and gives NaN. A negative value (eta > 1)
  is clamped to 0.

  Args:
    s: (respaced) schedule.
    model_out: `[N, 2C]` network output `[eps | v]` (`[N, C]` also works).
    x: `[N, C]` state at index `t`.
    t: `[N]` schedule indices.
    noise: standard-normal draw `[N, C]`; None (deterministic) for eta = 0.
    eta: 0 for deterministic DDIM, 1 for the ancestral (fixed-small variance)
      chain.
    temperature: scales the injected noise only.
    clip_x0: if set, clip the x0 estimate to `[-clip_x0, clip_x0]`.

  Returns:
    `(x at index t - 1, pred_x0)`.
  """
  c = x.shape[-1]
  eps = model_out[..., :c]
  pred_x0 = predict_x0_from_eps(s, x, t, eps)
  if clip_x0 is not None:
    pred_x0 = threshold_x0(pred_x0, clip_x0)
    eps = predict_eps_from_x0(s, x, t, pred_x0)
  a = _at(s.alphas_cumprod, t, x)
  a_prev = _at(s.alphas_cumprod_prev, t, x)
  beta = _at(s.betas, t, x)
  post_var = _at(s.posterior_variance, t, x)
  ratio = post_var / beta  # (1 - a') / (1 - a), both factors exact tables.
  one_minus_a_prev = ratio * jnp.square(
      _at(s.sqrt_one_minus_alphas_cumprod, t, x))
  eta2 = jnp.square(eta)
  eps_coef2 = ratio * ((1.0 - eta2) * beta + a * one_minus_a_prev / a_prev)
  x_prev = (jnp.sqrt(a_prev) * pred_x0 +
            jnp.sqrt(jnp.maximum(eps_coef2, 0.0)) * eps)
  if noise is not None:
    x_prev = x_prev + jnp.sqrt(eta2 * post_var) * noise * temperature
  return x_prev, pred_x0


def ddim_sample_loop(s: Schedule,
                     model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                     x_T: jax.Array,
                     *,
                     eta: float | jax.Array = 0.0,
                     key: jax.Array | None = None,
                     step_noise: jax.Array | None = None,
                     temperature: float | jax.Array = 1.0,
                     clip_x0: X0Clip = None,
                     return_trajectory: bool = False):
  """DDIM sampling from `x_T` through every step of `s`, as one scan.

  Steps, network timesteps (`s.timestep_map`) and the trajectory layout are
  those of `p_sample_loop`; each step is `ddim_step`. A respaced schedule
  jumps between its retained steps, so `create_schedule(..., '25')` gives
  25-step DDIM. The last step (index 0) returns the x0 estimate.

  A respacing to a single section of one step keeps only t = 0 (the least
  noisy step), not t = T - 1: starting there from pure noise is wrong. Use
  at least two steps ('2' keeps t = 0 and t = 999).

  Args:
    s: (respaced) sampling schedule with `T` steps.
    model_fn: `(x [..., C], network timestep (scalar int)) -> [..., 2C]`.
    x_T: initial noise `[..., C]`.
    eta: DDIM's eta. A Python 0 (the default) is the deterministic sampler:
      no noise is drawn and `key` is not needed. Anything else needs `key`
      or `step_noise`.
    key: PRNG key for the per-step noise (step k uses `fold_in(key, k)`, the
      same draws as `p_sample_loop` with this key).
    step_noise: alternatively, the per-step noise `[T, ..., C]` (step k
      processes schedule index `T-1-k`).
    temperature: scales the injected noise.
    clip_x0: optional x0 clipping (see `ddim_step`).
    return_trajectory: also return the states `[T+1, ...]` and x0 estimates
      `[T, ...]`.

  Returns:
    The samples `[..., C]` (and the trajectory if asked).
  """
  stochastic = not _is_static_zero(eta)
  if stochastic and step_noise is None and key is None:
    raise ValueError('ddim_sample_loop with eta != 0 needs `key` or '
                     '`step_noise`')

  def update(out, x, t, noise):
    return ddim_step(s, out, x, t, noise, eta, temperature, clip_x0)

  return _scan_steps(s, model_fn, x_T, update, key=key,
                     step_noise=step_noise, draws_noise=stochastic,
                     return_trajectory=return_trajectory)


def dpmpp_2m_sample_loop(s: Schedule,
                         model_fn: Callable[[jax.Array, jax.Array],
                                            jax.Array],
                         x_T: jax.Array,
                         *,
                         clip_x0: X0Clip = None) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al., 2022, algorithm 2): a deterministic
  second-order multistep solver of the probability-flow ODE in its
  data-prediction form, one network call per step of `s`, as one scan.

  With `alpha = sqrt(a)`, `sigma = sqrt(1 - a)` (a = alphas_cumprod) and
  `lambda = log(alpha / sigma)`, a step from schedule index i to i - 1 is

    x' = (sigma' / sigma) x - alpha' (exp(-h) - 1) D,   h = lambda' - lambda,
    D  = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i+1},    r = h_prev / h,

  where `x0` is the (thresholded) data prediction from the eps half of the
  network output (the learned-variance half is not used). The first step
  has no history and the last one (to index 0's `a' = 1`, sigma' = 0) has
  h = inf: both use `D = x0_i`, the first-order step, which is DDIM (eta 0);
  the last therefore returns the x0 estimate at the least noisy kept step.
  `-alpha' (exp(-h) - 1)` is evaluated as `alpha' - sigma' alpha / sigma`,
  exact when sigma' = 0.

  Args:
    s: (respaced) sampling schedule with `T` steps; respacings that keep the
      noisiest step ('trailingN', or 'N' with N >= 2) suit it.
    model_fn: `(x [..., C], network timestep (scalar int)) -> [..., 2C]`
      (`[..., C]` also works).
    x_T: initial noise `[..., C]`.
    clip_x0: optional x0 clipping or thresholding of every data prediction.

  Returns:
    The samples `[..., C]`.
  """
  num = s.num_steps
  c = x_T.shape[-1]
  steps = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
  log_snr = 0.5 * (jnp.log(s.alphas_cumprod) -
                   jnp.log1p(-s.alphas_cumprod))  # lambda per index.

  def body(carry, i):
    x, x0_prev, h_prev = carry
    out = model_fn(x, s.timestep_map[i])
    t = jnp.broadcast_to(i, x.shape[:-1])
    x0 = threshold_x0(predict_x0_from_eps(s, x, t, out[..., :c]), clip_x0)
    a, a_next = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
    alpha, sigma = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    alpha_next, sigma_next = jnp.sqrt(a_next), jnp.sqrt(1.0 - a_next)
    last = i == 0
    # lambda at the next index; a finite stand-in at index 0 (unused there).
    lam_next = jnp.where(last, log_snr[i] + 1.0,
                         log_snr[jnp.maximum(i - 1, 0)])
    h = lam_next - log_snr[i]
    second = (i < num - 1) & ~last
    r = jnp.where(second, h_prev / h, 1.0)
    d = jnp.where(second, x0 + (x0 - x0_prev) / (2.0 * r), x0)
    x_next = (sigma_next / sigma) * x + (alpha_next -
                                         sigma_next * alpha / sigma) * d
    return (x_next, x0, h), None

  init = (x_T, jnp.zeros_like(x_T), jnp.ones((), x_T.dtype))
  (x_0, _, _), _ = jax.lax.scan(body, init, steps)
  return x_0


def posterior_mean_sample(s: Schedule,
                          model_fn: Callable[[jax.Array, jax.Array],
                                             jax.Array],
                          x_T: jax.Array,
                          *,
                          t_index: int | jax.Array | None = None,
                          clip_x0: X0Clip = None) -> jax.Array:
  """One-network-call estimate: the model's posterior mean E[x0 | x_t].

  Treats `x_T` as the state at schedule index `t_index` (default: the last,
  noisiest index of `s`) and returns

    x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t),   a_t = alphas_cumprod,

  which under the eps-parameterisation is Tweedie's formula: an eps_hat that
  minimises the training MSE is E[eps | x_t], so x0_hat = E[x0 | x_t]. It is
  a single deterministic point per x_t, not a sample from p(x0), and at high
  noise it approaches the data mean (E[x0] as a_t -> 0).

  Precision: `1 / sqrt(a_t)` multiplies every error in eps_hat. For the
  1000-step cosine schedule a_999 = 2.4e-9, so that factor is 2.0e4: an eps
  error of 1e-4 moves x0_hat by 2, and float32 rounding alone (ulp ~ 6e-8
  relative on the two O(2e4 |x|) terms) contributes ~1e-3 |x_T|. Choosing a
  less noisy `t_index` trades this amplification for the mismatch between
  x_T ~ N(0, I) and the true marginal at that step.

  Only the noisiest retained step of `s` matters, so any schedule that keeps
  t = 999 (e.g. the sampling schedule '64') gives the same result as the
  unrespaced one. Do not build a '1' schedule for this: a one-step respacing
  keeps t = 0, where a_0 ~ 1 and x0_hat ~ x_T.

  Args:
    s: (respaced) schedule.
    model_fn: `(x [..., C], network timestep (scalar int)) -> [..., 2C]`.
    x_T: `[..., C]` state (pure noise for sampling).
    t_index: schedule index of `x_T`; defaults to `s.num_steps - 1`.
    clip_x0: if set, clip the estimate to `[-clip_x0, clip_x0]`.

  Returns:
    `[..., C]` x0 estimates.
  """
  num = s.num_steps
  if t_index is None:
    t_index = num - 1
  elif isinstance(t_index, int) and not 0 <= t_index < num:
    raise ValueError(f't_index {t_index} outside the schedule [0, {num})')
  out = model_fn(x_T, s.timestep_map[t_index])
  t = jnp.full(x_T.shape[:-1], t_index, jnp.int32)
  pred_x0 = predict_x0_from_eps(s, x_T, t, out[..., :x_T.shape[-1]])
  pred_x0 = threshold_x0(pred_x0, clip_x0)
  return pred_x0


def sample_loop(kind: str, s: Schedule,
                model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                x_T: jax.Array,
                *,
                key: jax.Array | None = None,
                temperature: float | jax.Array = 1.0,
                clip_x0: X0Clip = None,
                eta: float | jax.Array = 0.0) -> jax.Array:
  """Samples `[..., C]` from `x_T` with the sampler named by `kind`.

  Args:
    kind: one of `SAMPLERS`: 'ancestral' (`p_sample_loop`, needs `key`),
      'ddim' (`ddim_sample_loop`; deterministic unless `eta != 0`),
      'dpmpp_2m' (`dpmpp_2m_sample_loop`, deterministic) or
      'posterior_mean' (`posterior_mean_sample` at the noisiest step of
      `s`).
    s: (respaced) sampling schedule.
    model_fn: `(x [..., C], network timestep (scalar int)) -> [..., 2C]`.
    x_T: initial noise `[..., C]`.
    key: PRNG key for the injected noise ('ancestral', or 'ddim' with eta).
    temperature: scales the injected noise; no effect where none is injected
      (DDIM with eta = 0, 'posterior_mean').
    clip_x0: optional x0 clipping.
    eta: DDIM's eta; must stay 0 for the other samplers.

  Returns:
    The samples.

  Raises:
    ValueError: for an unknown `kind`, or `eta` given to a sampler other
      than 'ddim'.
  """
  if kind not in SAMPLERS:
    raise ValueError(f'unknown sampler {kind!r}; expected one of {SAMPLERS}')
  if kind != 'ddim' and not _is_static_zero(eta):
    raise ValueError(f"eta applies to the 'ddim' sampler only, not {kind!r}")
  if kind == 'ancestral':
    return p_sample_loop(s, model_fn, x_T, key=key, temperature=temperature,
                         clip_x0=clip_x0)
  if kind == 'ddim':
    return ddim_sample_loop(s, model_fn, x_T, eta=eta, key=key,
                            temperature=temperature, clip_x0=clip_x0)
  if kind == 'dpmpp_2m':
    return dpmpp_2m_sample_loop(s, model_fn, x_T, clip_x0=clip_x0)
  return posterior_mean_sample(s, model_fn, x_T, clip_x0=clip_x0)
