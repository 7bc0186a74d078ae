"""Few-step samplers in `gendd_jax/diffusion.py`: DDIM, DPM-Solver++(2M),
the posterior mean, trailing respacing and x0 thresholding.

`tests/fixtures/ddim_reference.npz` holds numbers from the authors' PyTorch
GenDD code (commit 9246d0b, its `diffusion/` package: `create_diffusion`
with the 1000-step cosine schedule and learned-range variance, then
`ddim_sample_loop_progressive` / `ddim_sample_loop`) run once with torch
2.13.0 on CPU, every Gaussian draw supplied. The network is a fixed function
of `(x [6, 4], network timestep t)`, stored as its tables:

  eps = model_A[t] * x + model_B[t] + model_D[t] * tanh(x @ model_W)
  v   = tanh(x @ model_Wv + model_cv[t]),     out = [eps | v]

`model_A`, `model_B` make eps the exact E[eps | x_t] for data
N(data_mu, data_sigma^2) per channel; the tanh term, scaled by
0.05 sqrt(abar_t), makes the model nonlinear. Runs (`<run>_*` arrays):
`s8_eta0`, `s25_eta0` (respacings '8', '25', eta = 0), `s25_eta0_clip`
(x0 clipped to [-1, 1]), `s25_eta1` (eta = 1) and `s8_eta0p5` (eta = 0.5),
each with `timestep_map`, `x_T`, `step_noise [T, 6, 4]` (step k processes
index T-1-k), the states after each step `traj_x [T, 6, 4]`, the x0
estimates `traj_pred_xstart` and `out`. (With 8 steps and eta = 1 the
reference returns NaN: `1 - abar_prev - sigma^2` rounds to -6e-8 at t = 999.)

Tolerances: every step but the noisiest agrees to ~1e-6 relative. The step
from t = 999 computes x0 = 2.0e4 (x - eps) (1 / sqrt(abar_999) = 2.0e4), so
one float32 rounding of either term, which XLA's fusion under `jit` changes,
moves x0 by up to `eps32 * 2.0e4 * |x|` ~ 6e-3; that step and everything
after it are compared at `_NOISIEST_ULPS` such roundings.
"""

from __future__ import annotations

import functools
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from configs import digits as digits_config
from gendd_jax import diffusion
from gendd_jax import errors
from gendd_jax import gendd
from gendd_jax import settings
from gendd_jax import train
from gendd_jax.cli import evaluate
from gendd_jax.cli import sweep_sampling
import testing

_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'fixtures', 'ddim_reference.npz')
_RUNS = ('s8_eta0', 's25_eta0', 's25_eta0_clip', 's25_eta1', 's8_eta0p5')
_EPS32 = float(np.finfo(np.float32).eps)
_NOISIEST_ULPS = 4.0
_MU = np.array([0.5, -1.0, 2.0, 0.0])
_SIGMA = np.array([0.3, 1.0, 0.5, 2.0])


def setUpModule():
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()


@functools.lru_cache(maxsize=None)
def _ref():
  with np.load(_FIXTURE) as f:
    return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=None)
def _schedule(spacing):
  # Built outside any trace and cached for the whole module.
  return diffusion.create_schedule('cosine', 1000, spacing)


def _run(name):
  """`(schedule, eta, clip_x0, arrays)` of a fixture run."""
  ref = _ref()
  arrays = {k[len(name) + 1:]: v for k, v in ref.items()
            if k.startswith(name + '_') and k[len(name) + 1:] in (
                'timestep_map', 'eta', 'clip', 'x_T', 'step_noise', 'traj_x',
                'traj_pred_xstart', 'out')}
  sched = _schedule(str(len(arrays['timestep_map'])))
  clip = 1.0 if bool(arrays['clip']) else None
  return sched, float(arrays['eta']), clip, arrays


def _fixture_model_fn(fixed_small=False):
  """The fixture's network; `fixed_small` sets v = -1 (posterior variance)."""
  ref = _ref()
  a, b, d, w, wv, cv = (jnp.asarray(ref[k]) for k in (
      'model_A', 'model_B', 'model_D', 'model_W', 'model_Wv', 'model_cv'))

  def fn(x, t):
    eps = a[t] * x + b[t] + d[t] * jnp.tanh(x @ w)
    v = -jnp.ones_like(x) if fixed_small else jnp.tanh(x @ wv + cv[t])
    return jnp.concatenate([eps, v], -1)
  return fn


def _gaussian_model_fn(mu, sigma):
  """Exact E[eps | x_t] for data x0 ~ N(mu, sigma^2), per channel.

  With x_t = a x0 + b eps (a = sqrt(abar_t), b = sqrt(1 - abar_t)),
  x_t ~ N(a mu, a^2 sigma^2 + b^2) and E[eps | x_t] = b (x_t - a mu) / var.
  The variance half is -1 (the posterior variance).
  """
  base = _schedule('')
  mu, sigma = jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32)

  def fn(x, t):
    a = base.sqrt_alphas_cumprod[t]
    b = base.sqrt_one_minus_alphas_cumprod[t]
    eps = b * (x - a * mu) / (a * a * sigma * sigma + b * b)
    return jnp.concatenate([eps, -jnp.ones_like(eps)], -1)
  return fn


def _gaussian_posterior_mean(t, x_t):
  """Closed-form E[x0 | x_t] in float64 at base timestep `t`."""
  abar = diffusion.respaced_tables('cosine', 1000, '')['alphas_cumprod'][t]
  a, b2 = np.sqrt(abar), 1.0 - abar
  x_t = np.asarray(x_t, np.float64)
  return (a * _SIGMA ** 2 * x_t + b2 * _MU) / (abar * _SIGMA ** 2 + b2)


def _noisiest_atol(sched, x):
  """Float32 rounding bound of x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps."""
  return (_NOISIEST_ULPS * _EPS32 * float(sched.sqrt_recip_alphas_cumprod[-1])
          * float(np.abs(x).max()))


def _assert_rel(actual, desired, rel, err_msg=''):
  """`|actual - desired| <= rel * max|desired|` everywhere."""
  desired = np.asarray(desired, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=0,
                             atol=rel * float(np.abs(desired).max()),
                             err_msg=err_msg)


_RUN_PARAMS = tuple(dict(testcase_name=n, name=n) for n in _RUNS)


# ---------------------------------------------------------------------------
# a. Parity with the reference DDIM.
# ---------------------------------------------------------------------------


class DDIMParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*_RUN_PARAMS)
  def test_fixture_layout(self, name):
    sched, eta, _, arr = _run(name)
    num = len(arr['timestep_map'])
    np.testing.assert_array_equal(
        arr['timestep_map'], diffusion.space_timesteps(1000, str(num)))
    np.testing.assert_array_equal(sched.timestep_map, arr['timestep_map'])
    self.assertEqual(arr['traj_x'].shape, (num, 6, 4))
    np.testing.assert_array_equal(arr['traj_x'][-1], arr['out'])
    # The last step returns the x0 estimate itself, for any eta.
    np.testing.assert_array_equal(arr['out'], arr['traj_pred_xstart'][-1])
    self.assertIn(eta, (0.0, 0.5, 1.0))

  @parameterized.named_parameters(*_RUN_PARAMS)
  def test_teacher_forced_steps(self, name):
    sched, eta, clip, arr = _run(name)
    fn = _fixture_model_fn()
    num = sched.num_steps
    before = np.concatenate([arr['x_T'][None], arr['traj_x'][:-1]])

    def one(x, i, noise):
      out = fn(x, sched.timestep_map[i])
      return diffusion.ddim_step(sched, out, x, jnp.full(x.shape[:-1], i),
                                 noise, eta, 1.0, clip)

    x_prev, pred_x0 = jax.jit(jax.vmap(one))(
        jnp.asarray(before), jnp.arange(num - 1, -1, -1),
        jnp.asarray(arr['step_noise']))
    # Measured <= 1.5e-6 (x) and 2.8e-6 (x0) relative after the first step.
    _assert_rel(x_prev[1:], arr['traj_x'][1:], 1e-5, 'x_prev')
    _assert_rel(pred_x0[1:], arr['traj_pred_xstart'][1:], 1e-5, 'pred_x0')
    # The noisiest step (measured |dx0| <= 2.0e-3, |dx| <= 4.3e-4).
    atol = _noisiest_atol(sched, arr['x_T'])
    np.testing.assert_allclose(pred_x0[0], arr['traj_pred_xstart'][0],
                               rtol=0, atol=atol)
    np.testing.assert_allclose(x_prev[0], arr['traj_x'][0], rtol=0, atol=atol)

  @parameterized.named_parameters(*_RUN_PARAMS)
  def test_end_to_end_after_noisiest_step(self, name):
    # Dropping the last index of every table leaves the chain of the other
    # steps unchanged (each index only reads its own entries).
    sched, eta, clip, arr = _run(name)
    tail = jax.tree.map(lambda v: v[:-1], sched)
    out = jax.jit(lambda x, noise: diffusion.ddim_sample_loop(
        tail, _fixture_model_fn(), x, eta=eta, step_noise=noise,
        clip_x0=clip))(jnp.asarray(arr['traj_x'][0]),
                       jnp.asarray(arr['step_noise'][1:]))
    _assert_rel(out, arr['out'], 1e-5)  # Measured <= 1.5e-6.

  @parameterized.named_parameters(*_RUN_PARAMS)
  def test_end_to_end(self, name):
    sched, eta, clip, arr = _run(name)
    out, states, pred_x0 = jax.jit(lambda x, noise: diffusion.ddim_sample_loop(
        sched, _fixture_model_fn(), x, eta=eta, step_noise=noise, clip_x0=clip,
        return_trajectory=True))(jnp.asarray(arr['x_T']),
                                 jnp.asarray(arr['step_noise']))
    num = sched.num_steps
    self.assertEqual(states.shape, (num + 1, 6, 4))
    self.assertEqual(pred_x0.shape, (num, 6, 4))
    np.testing.assert_array_equal(states[0], arr['x_T'])
    np.testing.assert_array_equal(states[-1], out)
    # The first step's rounding carries through (measured <= 4.3e-4 in the
    # states, 2.0e-3 in x0; atol ~ 2e-2).
    atol = _noisiest_atol(sched, arr['x_T'])
    np.testing.assert_allclose(states[1:], arr['traj_x'], rtol=0, atol=atol)
    np.testing.assert_allclose(pred_x0, arr['traj_pred_xstart'], rtol=0,
                               atol=atol)
    if clip is not None:
      self.assertLessEqual(float(np.abs(pred_x0).max()), clip)


# ---------------------------------------------------------------------------
# b. Gaussian data: the exact eps-predictor is known.
# ---------------------------------------------------------------------------


class GaussianDataTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('noisiest', '', None, 999), ('noisiest_of_64', '64', None, 999),
      ('middle', '', 500, 500), ('t10', '', 10, 10), ('t0', '', 0, 0))
  def test_posterior_mean_is_closed_form(self, spacing, t_index, t):
    sched = _schedule(spacing)
    x_t = jax.random.normal(jax.random.key(0), (64, 4))
    got = diffusion.posterior_mean_sample(
        sched, _gaussian_model_fn(_MU, _SIGMA), x_t, t_index=t_index)
    want = _gaussian_posterior_mean(t, x_t)
    # Rounding of eps (its terms ~|x|) and of the two x0 terms, amplified
    # by 1/sqrt(abar_t); measured 4.0e-3 at t = 999 (atol 3.5e-2), <= 5.2e-7
    # at t <= 500.
    sqrt_recip = diffusion.respaced_tables('cosine', 1000, '')[
        'sqrt_recip_alphas_cumprod'][t]
    atol = _NOISIEST_ULPS * _EPS32 * sqrt_recip * float(np.abs(x_t).max() + 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol)
    if t == 999:  # The estimate is ~ the data mean at the noisiest step.
      np.testing.assert_allclose(np.mean(np.asarray(got), 0), _MU, atol=0.01)

  def test_ddim_map_converges_to_data_distribution(self):
    # Elementwise affine model -> DDIM is an affine map x_T -> A x_T + B; its
    # image of N(0, 1) is N(B, A^2). The ODE it discretises maps N(0, 1) to
    # N(mu, sigma^2) (up to abar_999 ~ 2e-9), and DDIM is first order.
    fn = _gaussian_model_fn(_MU, _SIGMA)
    probe = jnp.stack([jnp.zeros(4), jnp.ones(4)])
    errors = {}
    for spacing, steps in (('250', 250), ('', 1000)):
      out = np.asarray(jax.jit(lambda x, s=_schedule(spacing):
                               diffusion.ddim_sample_loop(s, fn, x))(probe))
      shift, scale = out[0], out[1] - out[0]
      np.testing.assert_allclose(shift, _MU, atol=1e-4)  # Measured 5.1e-5.
      errors[steps] = np.abs(scale - _SIGMA) / _SIGMA
    self.assertLess(errors[1000].max(), 5e-3)  # Measured 2.5e-3.
    ratio = errors[250] / errors[1000]
    self.assertTrue(np.all((ratio > 3.0) & (ratio < 5.0)), ratio)

  def test_ddim_samples_match_data_distribution(self):
    n = 100_000
    x_T = jax.random.normal(jax.random.key(3), (n, 4))
    sched = _schedule('')
    out = np.asarray(jax.jit(lambda x: diffusion.ddim_sample_loop(
        sched, _gaussian_model_fn(_MU, _SIGMA), x))(x_T), np.float64)
    # 5 standard errors of the mean (sigma / sqrt(n)) and of the standard
    # deviation (sigma / sqrt(2n)), plus the 1000-step bias bound above.
    np.testing.assert_array_less(np.abs(out.mean(0) - _MU),
                                 5 * _SIGMA / np.sqrt(n) + 1e-4)
    np.testing.assert_array_less(np.abs(out.std(0) - _SIGMA),
                                 5 * _SIGMA / np.sqrt(2 * n) + 5e-3 * _SIGMA)

  def test_ddim_eta0_ignores_key(self):
    sched = _schedule('25')
    fn = _fixture_model_fn()
    x_T = jax.random.normal(jax.random.key(4), (6, 4))
    run = jax.jit(lambda x, key: diffusion.ddim_sample_loop(
        sched, fn, x, key=key))
    a = run(x_T, jax.random.key(1))
    np.testing.assert_array_equal(a, run(x_T, jax.random.key(2)))
    np.testing.assert_array_equal(a, run(x_T, jax.random.key(1)))
    no_key = jax.jit(lambda x: diffusion.ddim_sample_loop(sched, fn, x))
    np.testing.assert_array_equal(a, no_key(x_T))
    # A stochastic sampler with the same keys does differ.
    eta1 = jax.jit(lambda x, key: diffusion.ddim_sample_loop(
        sched, fn, x, eta=1.0, key=key))
    self.assertGreater(float(np.abs(eta1(x_T, jax.random.key(1)) -
                                    eta1(x_T, jax.random.key(2))).max()), 0.1)


# ---------------------------------------------------------------------------
# c. eta = 1 is the ancestral chain with the posterior variance.
# ---------------------------------------------------------------------------


class EtaOneTest(parameterized.TestCase):

  @parameterized.parameters('25', '')
  def test_steps_equal_ancestral_steps(self, spacing):
    # DDIM with eta = 1 has sigma^2 = posterior variance and the posterior
    # mean; v = -1 gives the ancestral step exactly that variance (t >= 1).
    sched = _schedule(spacing)
    fn = _fixture_model_fn(fixed_small=True)
    num = sched.num_steps
    kx, kn = jax.random.split(jax.random.key(5))
    x = 2.0 * jax.random.normal(kx, (num, 6, 4))
    noise = jax.random.normal(kn, (num, 6, 4))

    def both(x, i, noise):
      out = fn(x, sched.timestep_map[i])
      t = jnp.full(x.shape[:-1], i)
      return (diffusion.ddim_step(sched, out, x, t, noise, eta=1.0),
              diffusion.p_sample(sched, out, x, t, noise))

    (x_ddim, x0_ddim), (x_anc, x0_anc) = jax.jit(jax.vmap(both))(
        x, jnp.arange(num), noise)
    np.testing.assert_array_equal(x0_ddim, x0_anc)
    # Per step, relative to that step's x0 scale (measured <= 4.8e-7).
    scale = np.abs(np.asarray(x0_anc)).max((1, 2), keepdims=True)
    np.testing.assert_array_less(np.abs(np.asarray(x_ddim - x_anc)) / scale,
                                 1e-5)

  def test_loops_agree_for_the_same_key(self):
    sched = _schedule('25')
    fn = _fixture_model_fn(fixed_small=True)
    x_T = jax.random.normal(jax.random.key(6), (6, 4))
    key = jax.random.key(7)
    ddim = jax.jit(lambda x, k: diffusion.ddim_sample_loop(
        sched, fn, x, eta=1.0, key=k))(x_T, key)
    anc = jax.jit(lambda x, k: diffusion.p_sample_loop(
        sched, fn, x, key=k))(x_T, key)
    # Same per-step draws; the noisiest step's rounding bounds the gap
    # (measured 7.2e-7).
    np.testing.assert_allclose(ddim, anc, rtol=0,
                               atol=_noisiest_atol(sched, x_T))

  @parameterized.parameters('8', '')
  def test_eta1_finite_at_the_noisiest_step(self, spacing):
    # The textbook `1 - abar_prev - sigma^2` rounds below zero here.
    sched = _schedule(spacing)
    x_T = jax.random.normal(jax.random.key(8), (6, 4))
    out = diffusion.ddim_step(
        sched, _fixture_model_fn()(x_T, sched.timestep_map[-1]), x_T,
        jnp.full((6,), sched.num_steps - 1), jnp.zeros_like(x_T), eta=1.0)[0]
    self.assertTrue(np.all(np.isfinite(out)))


# ---------------------------------------------------------------------------
# d. Dispatch and argument checks.
# ---------------------------------------------------------------------------


class DispatchTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.sched = _schedule('8')
    self.fn = _fixture_model_fn()
    self.x_T = jax.random.normal(jax.random.key(9), (6, 4))

  def test_sampler_names(self):
    self.assertEqual(diffusion.SAMPLERS,
                     ('ancestral', 'ddim', 'dpmpp_2m', 'posterior_mean'))

  def test_ancestral_is_p_sample_loop(self):
    key = jax.random.key(10)
    got = jax.jit(lambda x, k: diffusion.sample_loop(
        'ancestral', self.sched, self.fn, x, key=k, temperature=0.7))(
            self.x_T, key)
    want = jax.jit(lambda x, k: diffusion.p_sample_loop(
        self.sched, self.fn, x, key=k, temperature=0.7))(self.x_T, key)
    np.testing.assert_array_equal(got, want)

  def test_ddim_is_ddim_sample_loop(self):
    got = diffusion.sample_loop('ddim', self.sched, self.fn, self.x_T,
                                clip_x0=1.5)
    want = diffusion.ddim_sample_loop(self.sched, self.fn, self.x_T,
                                      clip_x0=1.5)
    np.testing.assert_array_equal(got, want)
    key = jax.random.key(11)
    got = diffusion.sample_loop('ddim', self.sched, self.fn, self.x_T,
                                key=key, eta=0.5)
    want = diffusion.ddim_sample_loop(self.sched, self.fn, self.x_T, key=key,
                                      eta=0.5)
    np.testing.assert_array_equal(got, want)

  def test_posterior_mean_dispatch(self):
    got = diffusion.sample_loop('posterior_mean', self.sched, self.fn,
                                self.x_T)
    want = diffusion.posterior_mean_sample(self.sched, self.fn, self.x_T)
    np.testing.assert_array_equal(got, want)

  def test_unknown_kind_raises(self):
    with self.assertRaisesRegex(ValueError,
                                "'dpm'.*ancestral.*ddim.*dpmpp_2m"):
      diffusion.sample_loop('dpm', self.sched, self.fn, self.x_T)

  def test_eta_only_for_ddim(self):
    with self.assertRaisesRegex(ValueError, 'eta'):
      diffusion.sample_loop('ancestral', self.sched, self.fn, self.x_T,
                            key=jax.random.key(0), eta=1.0)

  def test_stochastic_ddim_needs_key(self):
    with self.assertRaisesRegex(ValueError, 'key'):
      diffusion.ddim_sample_loop(self.sched, self.fn, self.x_T, eta=1.0)

  def test_t_index_out_of_range(self):
    with self.assertRaises(ValueError):
      diffusion.posterior_mean_sample(self.sched, self.fn, self.x_T,
                                      t_index=8)

  def test_one_step_respacing_keeps_t0(self):
    # Why the one-step estimate takes the noisiest step of a longer schedule.
    self.assertEqual(diffusion.space_timesteps(1000, '1'), [0])
    self.assertEqual(diffusion.space_timesteps(1000, '2'), [0, 999])
    a = diffusion.posterior_mean_sample(_schedule('2'), self.fn, self.x_T)
    b = diffusion.posterior_mean_sample(_schedule(''), self.fn, self.x_T)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

  def test_one_scan_one_trace(self):
    calls = []

    def counted(x, t):
      calls.append(t)  # Runs at trace time only.
      return self.fn(x, t)

    jaxpr = jax.make_jaxpr(lambda x, k: diffusion.ddim_sample_loop(
        self.sched, counted, x, eta=0.5, key=k))(self.x_T, jax.random.key(0))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
    self.assertLen(scans, 1)
    self.assertEqual(scans[0].params['length'], 8)
    self.assertLen(calls, 1)


# ---------------------------------------------------------------------------
# e. Trailing respacing, DPM-Solver++(2M) and x0 thresholding.
# ---------------------------------------------------------------------------


def _gaussian_ode_solution(x_T, mu, sigma):
  """Where the probability-flow ODE takes `x_T` (at t = 999) for data
  N(mu, sigma^2): it keeps the standardised value (x_t - a mu) / sd_t."""
  abar = diffusion.respaced_tables('cosine', 1000, '')['alphas_cumprod'][999]
  a = np.sqrt(abar)
  sd = np.sqrt(abar * sigma ** 2 + 1.0 - abar)
  return mu + sigma * (np.asarray(x_T, np.float64) - a * mu) / sd


class TrailingSpacingTest(parameterized.TestCase):

  def test_steps(self):
    self.assertEqual(diffusion.space_timesteps(1000, 'trailing1'), [999])
    self.assertEqual(diffusion.space_timesteps(1000, 'trailing4'),
                     [249, 499, 749, 999])
    for n in (2, 3, 7, 64, 100, 1000):
      kept = diffusion.space_timesteps(1000, f'trailing{n}')
      self.assertLen(kept, n)
      self.assertEqual(kept[-1], 999)
    # The reference's rule at one step keeps only the least noisy step.
    self.assertEqual(diffusion.space_timesteps(1000, '1'), [0])

  def test_schedule_starts_at_the_noisiest_step(self):
    full = _schedule('')
    s = _schedule('trailing4')
    np.testing.assert_array_equal(s.timestep_map, [249, 499, 749, 999])
    np.testing.assert_allclose(s.alphas_cumprod,
                               full.alphas_cumprod[s.timestep_map],
                               rtol=1e-6)

  @parameterized.parameters('trailing', 'trailingx', 'trailing0',
                            'trailing1001')
  def test_bad_counts(self, spacing):
    with self.assertRaisesRegex(ValueError, 'trailing'):
      diffusion.space_timesteps(1000, spacing)

  def test_one_trailing_step_is_the_posterior_mean(self):
    # One step from t = 999 returns its x0 estimate, for every sampler.
    fn = _fixture_model_fn()
    x_T = jax.random.normal(jax.random.key(3), (6, 4))
    want = diffusion.posterior_mean_sample(_schedule(''), fn, x_T)
    for kind in ('ancestral', 'ddim', 'dpmpp_2m'):
      got = diffusion.sample_loop(kind, _schedule('trailing1'), fn, x_T,
                                  key=jax.random.key(0))
      # x0 at t = 999 is 2.0e4 (x - eps): a few float32 roundings apart.
      atol = _NOISIEST_ULPS * _EPS32 * 2.1e4 * float(jnp.max(jnp.abs(x_T)))
      np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=kind)


class DpmSolverTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.x_T = jax.random.normal(jax.random.key(4), (64, 4))
    self.fn = _gaussian_model_fn(_MU, _SIGMA)
    self.want = _gaussian_ode_solution(self.x_T, _MU, _SIGMA)

  def _error(self, kind, spacing):
    got = diffusion.sample_loop(kind, _schedule(spacing), self.fn, self.x_T)
    return float(np.max(np.abs(np.asarray(got, np.float64) - self.want)))

  def test_second_order(self):
    # Exact eps of Gaussian data: only the solver's discretisation errs.
    # Doubling the steps halves DDIM's error (first order) and quarters
    # DPM-Solver++(2M)'s (measured: 0.124, 0.040, 0.0125 at 20, 40, 80).
    dpm = [self._error('dpmpp_2m', f'trailing{n}') for n in (20, 40, 80)]
    ddim = [self._error('ddim', f'trailing{n}') for n in (20, 40, 80)]
    for d, e in zip(dpm, ddim):
      self.assertLess(d, 0.5 * e)
    self.assertLess(dpm[2] / dpm[1], 0.4)
    self.assertGreater(ddim[2] / ddim[1], 0.45)
    self.assertLess(dpm[2], 0.02)

  def test_many_steps_approach_ddim(self):
    # The fixture's nonlinear network: with 500 steps the second-order
    # correction vanishes and both solve the same ODE.
    fn = _fixture_model_fn()
    x_T = jax.random.normal(jax.random.key(5), (6, 4))
    dpm = diffusion.sample_loop('dpmpp_2m', _schedule('trailing500'), fn, x_T)
    ddim = diffusion.sample_loop('ddim', _schedule('trailing500'), fn, x_T)
    np.testing.assert_allclose(dpm, ddim, rtol=0, atol=0.02)
    few = diffusion.sample_loop('dpmpp_2m', _schedule('trailing8'), fn, x_T)
    self.assertGreater(float(jnp.max(jnp.abs(few - ddim))), 0.02)

  def test_two_steps_are_first_order(self):
    # The first step has no history and the last one lands on sigma = 0:
    # both are DDIM steps, so two steps equal two-step DDIM.
    fn = _fixture_model_fn()
    x_T = jax.random.normal(jax.random.key(6), (6, 4))
    for spacing in ('2', 'trailing2'):
      np.testing.assert_allclose(
          diffusion.sample_loop('dpmpp_2m', _schedule(spacing), fn, x_T),
          diffusion.sample_loop('ddim', _schedule(spacing), fn, x_T),
          rtol=1e-5, atol=1e-5)

  def test_one_scan(self):
    jaxpr = jax.make_jaxpr(lambda x: diffusion.dpmpp_2m_sample_loop(
        _schedule('8'), self.fn, x))(self.x_T)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
    self.assertLen(scans, 1)
    self.assertEqual(scans[0].params['length'], 8)


class ThresholdTest(parameterized.TestCase):

  def test_static_bound_clips(self):
    x = jnp.array([[-3.0, 0.5, 2.0]])
    np.testing.assert_array_equal(diffusion.threshold_x0(x, 1.0),
                                  [[-1.0, 0.5, 1.0]])
    self.assertIs(diffusion.threshold_x0(x, None), x)

  def test_dynamic_rows(self):
    # Row 0 lies inside the bound: unchanged. Row 1 has blown up: rescaled
    # by bound / max|x0| (percentile 100), or left as is by the clip-only
    # variant. Row 2 has one outlier beyond the bound.
    x = jnp.array([[0.5, -1.0, 1.5, 0.0],
                   [100.0, -50.0, 20.0, 0.0],
                   [0.5, -1.0, 1.0, 9.0]])
    th = diffusion.Threshold(100.0, True, 2.0)
    got = np.asarray(diffusion.threshold_x0(x, th))
    np.testing.assert_allclose(got[0], x[0])
    np.testing.assert_allclose(got[1], [2.0, -1.0, 0.4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got[2], np.asarray(x[2]) * 2.0 / 9.0,
                               rtol=1e-6)
    got = diffusion.threshold_x0(x, th._replace(rescale=False))
    np.testing.assert_allclose(got, x)  # Percentile 100 clips nothing.
    # At the 50th percentile (0.75 in row 2) the bound (2) wins: clip at 2.
    got = diffusion.threshold_x0(x, diffusion.Threshold(50.0, False, 2.0))
    np.testing.assert_allclose(got[2], [0.5, -1.0, 1.0, 2.0])
    np.testing.assert_allclose(got[1], [35.0, -35.0, 20.0, 0.0])

  @parameterized.parameters('ancestral', 'ddim', 'dpmpp_2m',
                            'posterior_mean')
  def test_rescaling_bounds_the_sample(self, kind):
    # A network whose eps is far off makes unbounded x0 estimates.
    fn = _fixture_model_fn()
    bad = lambda x, t: fn(x, t) * 3.0 + 1.0  # noqa: E731
    x_T = jax.random.normal(jax.random.key(7), (6, 4))
    sched = _schedule('trailing8')
    free = diffusion.sample_loop(kind, sched, bad, x_T,
                                 key=jax.random.key(1))
    self.assertGreater(float(jnp.max(jnp.abs(free))), 100.0)
    th = diffusion.Threshold(99.5, True, 1.5)
    got = diffusion.sample_loop(kind, sched, bad, x_T, key=jax.random.key(1),
                                clip_x0=th)
    self.assertLessEqual(float(jnp.max(jnp.abs(got))), 1.5 + 1e-5)
    got = diffusion.sample_loop(kind, sched, bad, x_T, key=jax.random.key(1),
                                clip_x0=th._replace(rescale=False))
    self.assertTrue(bool(jnp.all(jnp.isfinite(got))))


# ---------------------------------------------------------------------------
# f. The settings that reach the samplers, and the study's selection rule.
# ---------------------------------------------------------------------------


class SamplerSettingsTest(parameterized.TestCase):

  def _config(self, **sampler):
    config = digits_config.get_config()
    for k, v in sampler.items():
      config.sampler[k] = v
    return config

  def test_new_options_pass(self):
    s = settings.step_settings(
        self._config(kind='dpmpp_2m', steps='trailing8',
                     clip_x0='dynamic_clip:99', also_eval_published=False),
        'gendd', 10)
    self.assertEqual(s.sample.sampler, 'dpmpp_2m')
    self.assertEqual(s.sampling_steps, 'trailing8')
    self.assertEqual(s.sample.clip_x0, diffusion.Threshold(99.0, False))
    self.assertFalse(s.also_clipped)
    hash(s)  # Static argument of the jitted steps.
    s = settings.step_settings(
        self._config(clip_x0='data', also_eval_published=True), 'gendd', 10)
    self.assertTrue(s.also_published)
    self.assertTrue(s.clip_to_data)

  def test_published_sampler_beside_a_few_step_one(self):
    # A deterministic 4-step default, with the paper's 64-step CFG-2 sampler
    # evaluated beside it.
    s = settings.step_settings(self._config(
        steps='trailing4', cfg_scale=1.0, temperature=0.0,
        init_temperature=0.0, clip_x0='dynamic', also_eval_published=True,
        published_steps='64', published_cfg_scale=2.0), 'gendd', 10)
    self.assertTrue(s.also_published)
    self.assertEqual((s.sampling_steps, s.published_steps,
                      s.published_cfg_scale), ('trailing4', '64', 2.0))
    self.assertEqual((s.sample.temperature, s.sample.init_temperature),
                     (0.0, 0.0))
    paper = dict(steps='64', clip_x0='none', temperature=1.0,
                 init_temperature=1.0, also_eval_published=True)
    # Only the noise differs from the paper's: still evaluated beside it.
    for noise in (dict(temperature=0.0), dict(init_temperature=0.0)):
      s = settings.step_settings(self._config(**dict(paper, **noise)),
                                 'gendd', 10)
      self.assertTrue(s.also_published)
    # The paper's sampler itself: not evaluated twice.
    s = settings.step_settings(self._config(**paper), 'gendd', 10)
    self.assertFalse(s.also_published)

  @parameterized.parameters(
      (dict(kind='dpm'), 'sampler.kind'),
      (dict(steps='trailing'), 'sampler.steps'),
      (dict(steps='trailing2000'), 'sampler.steps'),
      (dict(clip_x0='dynamic:0'), 'percentile'),
      (dict(clip_x0='dymanic'), 'clip_x0'),
      (dict(published_steps='trailing8', also_eval_published=True),
       'also_eval_published'),
      (dict(temperature=-1.0), 'temperature'),
      (dict(init_temperature=-0.1), 'init_temperature'))
  def test_bad_values_fail_clearly(self, sampler, message):
    with self.assertRaisesRegex(errors.ConfigError, message):
      settings.step_settings(self._config(**sampler), 'gendd', 10)

  def test_evaluate_spec_takes_the_data_bound(self):
    config = self._config()
    spec = evaluate.sampler_spec(config, sampler='dpmpp_2m',
                                 steps='trailing4', clip_x0='dynamic',
                                 clip_bound=7.0)
    self.assertEqual(spec.clip_x0, diffusion.Threshold(99.5, True, 7.0))
    self.assertIn('rescaled', evaluate.describe_clip(spec.clip_x0))
    with self.assertRaisesRegex(ValueError, 'dpm.*expected one of'):
      gendd.sampling_schedule('cosine', 1000, '8', 'dpm')

  def test_evaluate_defaults_apart_from_training(self):
    # Standalone evaluation's defaults (`eval_*`) leave the training loop's
    # sampler alone; arguments override both.
    config = self._config(steps='64', cfg_scale=2.0, temperature=1.0,
                          init_temperature=1.0, clip_x0='data',
                          eval_steps='trailing16', eval_cfg_scale=1.0,
                          eval_temperature=0.0, eval_clip_x0='dynamic')
    spec = evaluate.sampler_spec(config, clip_bound=3.0)
    self.assertEqual((spec.steps, spec.cfg_scale, spec.temperature),
                     ('trailing16', 1.0, 0.0))
    self.assertEqual(spec.clip_x0, diffusion.Threshold(99.5, True, 3.0))
    spec = evaluate.sampler_spec(config, steps='64', cfg_scale=3.0,
                                 temperature=0.5, clip_x0='data',
                                 clip_bound=3.0)
    self.assertEqual((spec.steps, spec.cfg_scale, spec.temperature,
                      spec.clip_x0), ('64', 3.0, 0.5, 3.0))
    s = settings.step_settings(config, 'gendd', 10)
    self.assertEqual((s.sampling_steps, s.sample.cfg_scale,
                      s.sample.temperature, s.clip_to_data),
                     ('64', 2.0, 1.0, True))


class SelectionRuleTest(absltest.TestCase):

  def _row(self, sampler, steps, clip, top1, cost):
    return dict(sampler=sampler, steps=steps, clip_x0=clip, top1=top1,
                cost=cost)

  def test_cheapest_within_tolerance_of_the_best(self):
    rows = [self._row('ancestral', '64', 'none', 87.4, 128),
            self._row('posterior_mean', '1', 'none', 87.3, 2),
            self._row('ancestral', '64', 'data', 97.2, 128),
            self._row('ddim', '8', 'data', 96.9, 16),
            self._row('dpmpp_2m', '8', 'data', 97.1, 16),
            self._row('dpmpp_2m', '4', 'data', 97.05, 8)]
    best, pick = sweep_sampling.choose(rows, 0.2)
    self.assertEqual(best, rows[2])  # Clipped beats the paper's sampler.
    self.assertEqual(pick, rows[5])  # Not the 1-call 87.3%.
    best, pick = sweep_sampling.choose(rows, 0.12)
    self.assertEqual(pick, rows[4])

  def test_merge_of_studies_per_clipping(self):
    def study(clip, rows):
      return dict(rows=rows, clip_x0=clip, runs=['a', 'b'], seeds=1,
                  probe_top1=98.0)
    row = lambda steps, top1, cost: dict(  # noqa: E731
        sampler='ancestral', steps=steps, top1=top1, cost=cost,
        top1_std=0.0, top5=100.0, images_per_sec=1000.0 / cost)
    res = sweep_sampling.merge(
        [study('none', [row('100', 97.8, 200), row('8', 97.7, 16)]),
         study('data', [row('100', 98.9, 200), row('16', 99.1, 32),
                        row('8', 98.8, 16)])], 'ancestral:100', 0.2)
    self.assertEqual(res['reference']['clip_x0'], 'none')
    # No export on disk for runs 'a', 'b': scale and temperature unknown.
    self.assertEqual(sweep_sampling._key(res['best']),
                     ('ancestral', '16', 'data', None, None, None))
    self.assertEqual(res['recommended'], res['best'])  # 8 steps: -0.3.
    self.assertAlmostEqual(res['speedup_calls'], 200 / 32)
    self.assertIn('(best, recommended)', sweep_sampling.markdown(res))
    with self.assertRaisesRegex(ValueError, 'same runs'):
      sweep_sampling.merge([study('none', []), dict(study('data', []),
                                                    seeds=2)],
                           'ancestral:100', 0.2)
    with self.assertRaisesRegex(ValueError, 'reference'):
      sweep_sampling.merge([study('data', [row('100', 98.9, 200)])],
                           'ancestral:100', 0.2)

  def test_sweep_of_a_run_that_clips_by_default(self):
    # The bundled example's configs clip x0 to the data range by default;
    # the sweep evaluates such a run (it once failed asking for the bound
    # before evaluating anything).
    c = testing.gendd_config()
    c.sampler.clip_x0 = 'data'
    run = testing.workdir('gendd_clips')
    res_train = train.train_and_evaluate(c, run, quiet=True)
    res = sweep_sampling.sweep([run], ['ancestral', 'posterior_mean'], ['2'],
                               seeds=2, reference='ancestral:2',
                               tolerance=0.2, clips=('data', 'none'),
                               cfg_scales=['1'], temperatures=['0', '1'],
                               init_temperatures=['0', '1'])
    # Unguided settings, ancestral ones at both temperatures (the posterior
    # mean injects no noise: once, at the run's), each from both x_T
    # scales, plus the paper's sampler at the run's scale (2) and
    # temperatures (1).
    self.assertEqual(sorted(sweep_sampling._key(r) for r in res['rows']),
                     sorted([('ancestral', '2', clip, 1.0, tau, x)
                             for clip in ('data', 'none')
                             for tau in (0.0, 1.0) for x in (0.0, 1.0)] +
                            [('ancestral', '2', 'none', 2.0, 1.0, 1.0)] +
                            [('posterior_mean', '1', clip, 1.0, 1.0, x)
                             for clip in ('data', 'none')
                             for x in (0.0, 1.0)]))
    # No noise at all: the same predictions whatever the seed.
    zero = [r for r in res['rows'] if r['temperature'] == 0.0 and
            r['init_temperature'] == 0.0]
    self.assertLen(zero, 2)
    for r in zero:
      self.assertEqual(r['top1_per_seed'][0], r['top1_per_seed'][1])
      self.assertEqual(r['top1_std'], 0.0)
    n = len(res_train['labels'])
    calls = {('ancestral', 1.0): 2, ('ancestral', 2.0): 4,
             ('posterior_mean', 1.0): 1}
    for r in res['rows']:
      self.assertEqual(r['images'], n)
      self.assertEqual(r['cost'], calls[r['sampler'], r['cfg_scale']])
      self.assertBetween(r['top1'], 0.0, 100.0)
    self.assertEqual(sweep_sampling._key(res['reference']),
                     ('ancestral', '2', 'none', 2.0, 1.0, 1.0))
    table = sweep_sampling.markdown(res)
    self.assertRegex(table, r'\| ancestral \*\*\([a-z, ]*paper\)\*\* '
                     r'\| 2 \| none \| 2 \| 1 \| 1 \| 4 \|')
    self.assertRegex(table, r'\| ancestral( \*\*.*\*\*)? \| 2 \| data \| 1 '
                     r'\| 0 \| 0 \| 2 \|')
    for flags, message in ((dict(cfg_scales=['0.5']), 'unguided'),
                           (dict(cfg_scales=['two']), "'two' is not a number"),
                           (dict(temperatures=['-1']), 'temperature is 0'),
                           (dict(init_temperatures=['-0.5']),
                            'temperature is 0')):
      with self.assertRaisesRegex(ValueError, message):
        sweep_sampling.sweep([run], ['ancestral'], ['2'], seeds=1,
                             reference='ancestral:2', tolerance=0.2, **flags)
    # An older study of the same run, which recorded neither the guidance
    # scale nor the temperature: merged, its rows take the run's (read from
    # its export), and a setting both studies measured is kept once, as the
    # first study measured it.
    old_ref = dict(res['reference'], top1=res['reference']['top1'] - 1.0)
    del old_ref['cfg_scale'], old_ref['temperature']
    del old_ref['init_temperature']
    old = dict(res, rows=[old_ref])
    del old['temperatures'], old['cfg_scales'], old['init_temperatures']
    merged = sweep_sampling.merge([old, res], 'ancestral:2', 0.2)
    keys = [sweep_sampling._key(r) for r in merged['rows']]
    self.assertCountEqual(keys, [sweep_sampling._key(r) for r in res['rows']])
    self.assertEqual(merged['reference']['top1'],
                     res['reference']['top1'] - 1.0)

  def test_plot_lines_are_each_family_s_best_per_cost(self):
    def row(sampler, temperature, cost, top1):
      return dict(sampler=sampler, temperature=temperature, cost=cost,
                  top1=top1, steps='8', clip_x0='data')
    rows = [row('ancestral', 1.0, 8, 95.0), row('ancestral', 1.0, 8, 96.0),
            row('ancestral', 0.0, 8, 97.0), row('ancestral', 1.0, 4, 90.0),
            row('dpmpp_2m', 1.0, 8, 94.0), row('dpmpp_2m', 1.0, 8, 93.0)]
    lines = sweep_sampling.frontiers(rows)
    self.assertEqual(
        {k: [(r['cost'], r['top1']) for r in v] for k, v in lines.items()},
        {'ancestral, noise temperature 1': [(4, 90.0), (8, 96.0)],
         'ancestral, noise temperature 0': [(8, 97.0)],
         'dpmpp_2m': [(8, 94.0)]})

  def test_settings_and_costs(self):
    got = sweep_sampling._settings(['ddim', 'posterior_mean'],
                                   ['2', 'trailing4'], ['none', 'dynamic'])
    self.assertEqual(got, [('ddim', '2', 'none'),
                           ('ddim', 'trailing4', 'none'),
                           ('posterior_mean', '1', 'none'),
                           ('ddim', '2', 'dynamic'),
                           ('ddim', 'trailing4', 'dynamic'),
                           ('posterior_mean', '1', 'dynamic')])
    self.assertEqual(sweep_sampling.cost('dpmpp_2m', 'trailing4', 2.0), 8)
    self.assertEqual(sweep_sampling.cost('ancestral', '100', 1.0), 100)
    self.assertEqual(sweep_sampling.cost('posterior_mean', '64', 2.0), 2)
    for args, message in (((['dpm'], ['2'], ['none']), 'dpm'),
                          ((['ddim'], ['two'], ['none']), 'two'),
                          ((['ddim'], ['2'], ['clip']), 'clip')):
      with self.assertRaisesRegex(ValueError, message):
        sweep_sampling._settings(*args)


if __name__ == '__main__':
  absltest.main()
