"""The work-saving paths equal the plain row-wise head forward.

Training shares the condition embedding per image and the time embedding
per timestep; sampling computes the adaLN modulations once per distinct
conditioning (per (step, image, token) for the conditional branch, shared by
the draws; per (step, token) for the unconditional one, tabulated for the
whole schedule). Each is compared with the layout where every token row
carries its own timestep, condition and token index and goes through
`DenoiserMLP.__call__`, with the same random draws.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import diffusion
from gendd_jax import gendd
import testing

_C, _DZ, _W, _K = 4, 6, 16, 3


def _head(depth=2, remat=False, seed=0):
  """A tiny head with random values in every parameter (the adaLN and
  output layers start at zero, which would hide their inputs)."""
  return testing.random_head(_C, _DZ, _W, depth, _K, seed, freq_dim=16,
                          remat=remat, scale=0.3)


def _rowwise(head, x, t_net, c, token_idx):
  """`head.__call__` on every row of `x: [..., C]` (`c`, `token_idx`
  broadcast to the rows; `t_net` a scalar)."""
  lead = x.shape[:-1]
  n = int(np.prod(lead))
  c = jnp.broadcast_to(c, lead + c.shape[-1:]).reshape(n, -1)
  idx = jnp.broadcast_to(token_idx, lead).reshape(n)
  t = jnp.full((n,), t_net)
  return head(x.reshape(n, -1), t, c, idx).reshape(lead + (-1,))


class ModulatedTrunkTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_equals_trunk_and_rowwise_call(self, remat):
    head = _head(remat=remat)
    x = jax.random.normal(jax.random.key(1), (2, 5, _K, _C))
    t = jnp.array(417)
    c = jax.random.normal(jax.random.key(2), (5, 1, _DZ))
    y = head.embed_time(t) + head.embed_cond(c) + head.pos_table()  # [5,K,W]

    graphdef, state = nnx.split(head)

    @jax.jit
    def run(state, x, y):  # Merged inside: `nnx.remat` needs own Variables.
      h = nnx.merge(graphdef, state)
      return h.trunk_modulated(x, h.modulations(y)), h.trunk(x, y)

    got, plain = run(state, x, y)
    np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-6)
    want = _rowwise(head, x, t, c, jnp.arange(_K))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    self.assertEqual(got.shape, (2, 5, _K, 2 * _C))

  def test_modulations_shapes_and_count(self):
    head = _head(depth=3)
    mods = head.modulations(jnp.ones((_K, _W)))
    self.assertEqual([len(m) for m in mods], [3, 3, 3, 2])
    for m in mods:
      for part in m:
        self.assertEqual(part.shape, (_K, _W))

  def test_rejects_wrong_number_of_modulations(self):
    head = _head()
    mods = head.modulations(jnp.ones((_K, _W)))
    with self.assertRaisesRegex(ValueError, 'expected 3 modulations'):
      head.trunk_modulated(jnp.ones((_K, _C)), mods[:-1])


def _loss_rowwise(head, schedule, key, z, target, settings):
  """`gendd.diffusion_loss`'s draws, one row-wise network call per row."""
  tokens = gendd.split_tokens(target, settings.token_dim)
  b, k, c = tokens.shape
  rows = (settings.diffusion_batch_mul, b, k)
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t = jax.random.randint(k_t, rows, 0, schedule.num_steps)
  noise = jax.random.normal(k_noise, rows + (c,))
  drop = jax.random.bernoulli(k_drop, settings.cond_drop_prob, rows)
  cond = jnp.where(drop[..., None], 0.0, z[None, :, None, :])
  idx = jnp.broadcast_to(jnp.arange(k), rows).reshape(-1)
  cond = cond.reshape(-1, z.shape[-1])
  x0 = jnp.broadcast_to(tokens[None], rows + (c,)).reshape(-1, c)

  def model_fn(xt, t_net):
    return head(xt, t_net, cond, idx)

  terms = diffusion.training_losses(schedule, model_fn, x0, t.reshape(-1),
                                    noise.reshape(-1, c))
  return jnp.mean(terms['loss'])


class LossTest(absltest.TestCase):

  def test_loss_and_gradients_equal_rowwise(self):
    head = _head()
    sched = diffusion.create_schedule('cosine', 1000, '')
    z = jax.random.normal(jax.random.key(3), (4, _DZ))
    target = jax.random.normal(jax.random.key(4), (4, _K * _C))
    settings = gendd.LossSettings(_C, 3, 0.3, True)
    key = jax.random.key(5)
    graphdef, params = nnx.split(head)

    def ours(p):
      return gendd.diffusion_loss(nnx.merge(graphdef, p), sched, key, z,
                                  target, settings)[0]

    def rows(p):
      return _loss_rowwise(nnx.merge(graphdef, p), sched, key, z, target,
                           settings)

    (v0, g0), (v1, g1) = jax.jit(lambda p: (
        jax.value_and_grad(ours)(p), jax.value_and_grad(rows)(p)))(params)
    self.assertTrue(np.isfinite(float(v0)))
    np.testing.assert_allclose(float(v0), float(v1), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _sample_rowwise(head, schedule, key, z, settings):
  """Sampling as the reference does it: both CFG branches row by row, the
  unconditional one with a zero condition; draws as `sample_features`."""
  shape = (settings.num_sampling, z.shape[0], _K, settings.token_dim)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, shape)
  cond = z[:, None, :]
  idx = jnp.arange(_K)

  def cond_fn(x, t_net):
    return _rowwise(head, x, t_net, cond, idx)

  def uncond_fn(x, t_net):
    return _rowwise(head, x, t_net, jnp.zeros_like(cond), idx)

  model_fn = diffusion.cfg_model_fn(cond_fn, uncond_fn, settings.cfg_scale)
  tokens = diffusion.sample_loop(settings.sampler, schedule, model_fn, x_T,
                                 key=k_loop,
                                 temperature=settings.temperature)
  return jnp.mean(gendd.merge_tokens(tokens), 0)


class SampleTest(parameterized.TestCase):

  @parameterized.parameters('ancestral', 'ddim', 'posterior_mean')
  def test_cfg_sampling_equals_rowwise(self, sampler):
    head = _head(seed=1)
    sched = gendd.sampling_schedule('cosine', 1000, '4', sampler)
    z = jax.random.normal(jax.random.key(6), (3, _DZ))
    settings = gendd.SampleSettings(_C, 2, 2.0, 1.0, sampler=sampler)
    key = jax.random.key(7)

    @jax.jit
    def run(z):
      return (gendd.sample_features(head, sched, key, z, settings),
              _sample_rowwise(head, sched, key, z, settings),
              _sample_rowwise(head, sched, key, z,
                              settings._replace(cfg_scale=1.0)))

    got, want, no_cfg = run(z)
    self.assertEqual(got.shape, (3, _K * _C))
    self.assertTrue(np.all(np.isfinite(np.asarray(got))))
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    # Guidance changes the samples, so the match above is not vacuous.
    self.assertGreater(float(jnp.abs(want - no_cfg).max()), 1e-2 * scale)

  def test_tabulated_and_per_step_modulations_agree(self):
    head = _head(seed=2)
    sched = gendd.sampling_schedule('cosine', 1000, '5')
    z = jax.random.normal(jax.random.key(8), (2, _DZ))
    settings = gendd.SampleSettings(_C, 1, 3.0, 1.0)
    key = jax.random.key(9)
    run = jax.jit(lambda z: gendd.sample_features(head, sched, key, z,
                                                  settings))
    tabulated = run(z)
    saved = gendd._MAX_TABLE_BYTES
    gendd._MAX_TABLE_BYTES = 0  # Too small for any table: per step.
    try:
      per_step = jax.jit(lambda z: gendd.sample_features(
          head, sched, key, z, settings))(z)
    finally:
      gendd._MAX_TABLE_BYTES = saved
    scale = float(jnp.abs(per_step).max())
    np.testing.assert_allclose(tabulated, per_step, rtol=0,
                               atol=1e-5 * scale)


if __name__ == '__main__':
  absltest.main()
