"""Invariants of the GenDD objective (`gendd_jax/gendd.py`).

The objective is checked against straightforward re-derivations of the same
math: the training loss against the row-wise reference layout (every token
row carries its own condition, timestep and token index and the network is
called row by row), the sampler against a plain `p_sample_loop` over the
head's row-wise `__call__`. Both reproduce the key splits inside `gendd.py`,
so they use exactly the same random draws; agreement proves that doing the
image-only and timestep-only work once does not change the math.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import diffusion
from gendd_jax import gendd
import testing


@functools.lru_cache(maxsize=None)
def _schedule(spacing):
  # Built outside any trace and cached for the whole module.
  return diffusion.create_schedule('cosine', 1000, spacing)


_head = testing.random_head


def _rows_reference(head, schedule, key, z, target, settings):
  """The loss in the reference layout, one network call per token row.

  Rows are the `[B * K]` token batch tiled `M` times as whole blocks; row
  `(m, b, k)` holds token `k` of image `b`, condition `z[b]` (zero if
  dropped) and token index `k`. The draws replicate `gendd.diffusion_loss`.
  """
  tokens = gendd.split_tokens(target, settings.token_dim)
  b, k, c = tokens.shape
  m = settings.diffusion_batch_mul
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t = jax.random.randint(k_t, (m, b, k), 0, schedule.num_steps)
  noise = jax.random.normal(k_noise, (m, b, k, c), tokens.dtype)
  x0_rows = jnp.tile(tokens.reshape(b * k, c), (m, 1))
  z_rows = jnp.tile(jnp.repeat(z, k, axis=0), (m, 1))
  idx_rows = jnp.tile(jnp.arange(k), m * b)
  if settings.cond_drop_prob > 0:
    drop = jax.random.bernoulli(k_drop, settings.cond_drop_prob, (m, b, k))
    z_rows = jnp.where(drop.reshape(-1, 1), 0.0, z_rows)
  terms = diffusion.training_losses(
      schedule, lambda x, tt: head(x, tt, z_rows, idx_rows), x0_rows,
      t.reshape(-1), noise.reshape(-1, c), use_vb=settings.use_vb)
  return (jnp.mean(terms['loss']), jnp.mean(terms['mse']),
          jnp.mean(terms['vb']))


def _sample_reference(head, schedule, key, z, settings):
  """Per-draw samples `[S, B, D]` from `p_sample_loop` over `head.__call__`.

  Guidance as in `diffusion.cfg_model_fn`, with the zero condition for the
  unconditional branch. The noise replicates `gendd.sample_features`.
  """
  s, b, c = settings.num_sampling, z.shape[0], settings.token_dim
  k = head.num_tokens
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, (s, b, k, c),
                          z.dtype) * settings.init_temperature
  z_rows = jnp.tile(jnp.repeat(z, k, axis=0), (s, 1))
  idx_rows = jnp.tile(jnp.arange(k), s * b)

  def rowwise(cond):
    def fn(x, t_net):
      rows = x.reshape(-1, c)
      t_rows = jnp.full((rows.shape[0],), t_net)
      return head(rows, t_rows, cond, idx_rows).reshape(x.shape[:-1] +
                                                        (2 * c,))
    return fn

  model_fn = diffusion.cfg_model_fn(rowwise(z_rows),
                                    rowwise(jnp.zeros_like(z_rows)),
                                    settings.cfg_scale)
  if settings.temperature == 0.0:
    tokens = diffusion.p_sample_loop(
        schedule, model_fn, x_T,
        step_noise=jnp.zeros((schedule.num_steps,) + x_T.shape),
        clip_x0=settings.clip_x0)
  else:
    tokens = diffusion.p_sample_loop(
        schedule, model_fn, x_T, key=k_loop, temperature=settings.temperature,
        clip_x0=settings.clip_x0)
  return gendd.merge_tokens(tokens)


def _assert_close(actual, desired, rtol, err_msg=''):
  """allclose with an absolute tolerance relative to `max |desired|`."""
  desired = np.asarray(desired, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired,
                             rtol=rtol, atol=rtol * np.abs(desired).max(),
                             err_msg=err_msg)


class TokenTest(parameterized.TestCase):

  def test_split_is_contiguous_chunks_and_merge_inverts_it(self):
    x = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12)
    tokens = gendd.split_tokens(x, 4)
    self.assertEqual(tokens.shape, (2, 3, 4))
    for k in range(3):
      np.testing.assert_array_equal(tokens[:, k], x[:, 4 * k:4 * (k + 1)])
    np.testing.assert_array_equal(gendd.merge_tokens(tokens), x)

  def test_merge_keeps_leading_dims(self):
    x = jax.random.normal(jax.random.key(0), (3, 2, 5, 4))
    self.assertEqual(gendd.merge_tokens(x).shape, (3, 2, 20))
    np.testing.assert_array_equal(
        gendd.split_tokens(gendd.merge_tokens(x), 4), x)

  @parameterized.parameters(5, 7, 24)
  def test_split_rejects_non_divisor(self, token_dim):
    with self.assertRaisesRegex(ValueError, f'token_dim {token_dim}'):
      gendd.split_tokens(jnp.zeros((2, 12)), token_dim)


class ContractTargetTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    k1, k2 = jax.random.split(jax.random.key(0))
    self.feat = jax.random.normal(k1, (5, 8))
    self.w = jax.random.normal(k2, (3, 8))
    self.labels = jnp.array([0, 2, 1, 2, 0])

  def test_smooth_zero_returns_teacher_feature(self):
    out = gendd.contract_target(self.feat, self.labels, self.w, 0.0)
    np.testing.assert_array_equal(out, self.feat)

  def test_unsupervised_touches_no_label(self):
    # labels None: the target is the feature whatever the smoothing says.
    out = gendd.contract_target(self.feat, None, self.w, 0.9)
    np.testing.assert_array_equal(out, self.feat)

  def test_smooth_one_returns_class_rows(self):
    out = gendd.contract_target(self.feat, self.labels, self.w, 1.0)
    np.testing.assert_array_equal(out, self.w[self.labels])

  def test_interpolates(self):
    out = gendd.contract_target(self.feat, self.labels, self.w, 0.25)
    np.testing.assert_allclose(
        out, 0.75 * self.feat + 0.25 * self.w[self.labels], rtol=1e-6)

  def test_soft_one_hot_equals_int_labels(self):
    soft = jax.nn.one_hot(self.labels, 3)
    np.testing.assert_allclose(
        gendd.contract_target(self.feat, soft, self.w, 0.7),
        gendd.contract_target(self.feat, self.labels, self.w, 0.7),
        rtol=1e-6, atol=1e-6)

  def test_soft_mixture_is_convex_combination(self):
    soft = jnp.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0],
                      [1.0, 0.0, 0.0], [0.1, 0.8, 0.1]])
    out = gendd.contract_target(self.feat, soft, self.w, 0.6)
    centers = np.einsum('bn,nd->bd', np.asarray(soft), np.asarray(self.w))
    np.testing.assert_allclose(out, 0.4 * np.asarray(self.feat) +
                               0.6 * centers, rtol=1e-5, atol=1e-6)

  def test_label_mask_zero_keeps_feature(self):
    mask = jnp.array([True, False, True, False, False])
    out = gendd.contract_target(self.feat, self.labels, self.w, 0.9, mask)
    full = gendd.contract_target(self.feat, self.labels, self.w, 0.9)
    for i, keep in enumerate(np.asarray(mask)):
      want = full[i] if keep else self.feat[i]
      np.testing.assert_array_equal(out[i], want, err_msg=f'row {i}')


class MixFeaturesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.z = jax.random.normal(jax.random.key(1), (6, 5))
    self.a = jax.random.normal(jax.random.key(2), (5, 8))
    self.c = jax.random.normal(jax.random.key(3), (8,))
    self.target = self.z @ self.a + self.c  # An affine function of z.

  def test_beta_zero_is_identity(self):
    z, t = gendd.mix_features(jax.random.key(0), self.z, self.target, 0.0)
    self.assertIs(z, self.z)
    self.assertIs(t, self.target)

  @parameterized.parameters(0.2, 1.0, 5.0)
  def test_one_lambda_and_permutation_for_both(self, beta):
    key = jax.random.key(7)
    z, t = gendd.mix_features(key, self.z, self.target, beta)
    # Any convex mixture of rows commutes with the affine map only when
    # z and target share the mixing weights and the permutation.
    np.testing.assert_allclose(t, z @ self.a + self.c, rtol=1e-5, atol=1e-5)
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, beta, beta)
    perm = jax.random.permutation(k_perm, 6)
    self.assertGreater(float(lam), 0.0)
    self.assertLess(float(lam), 1.0)
    self.assertFalse(np.array_equal(np.asarray(perm), np.arange(6)))
    np.testing.assert_allclose(z, lam * self.z + (1 - lam) * self.z[perm],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        t, lam * self.target + (1 - lam) * self.target[perm], rtol=1e-6,
        atol=1e-6)
    self.assertGreater(float(jnp.abs(z - self.z).max()), 1e-3)


def _loss_fn(head, sched, settings, with_reference=False):
  """Jitted `(key, z, target) -> (loss, mse, vb)` (and the reference's)."""
  graphdef, state = nnx.split(head)

  def fn(st, key, z, target):
    h = nnx.merge(graphdef, st)
    loss, aux = gendd.diffusion_loss(h, sched, key, z, target, settings)
    ours = (loss, aux['mse'], aux['vb'])
    if with_reference:
      return ours, _rows_reference(h, sched, key, z, target, settings)
    return ours

  jitted = jax.jit(fn)
  return lambda *args: jitted(state, *args)


def _sample_fn(head, sched, settings, with_reference=False):
  """Jitted `(key, z) -> features` (and the reference's per-draw samples)."""
  graphdef, state = nnx.split(head)

  def fn(st, key, z):
    h = nnx.merge(graphdef, st)
    ours = gendd.sample_features(h, sched, key, z, settings)
    if with_reference:
      return ours, _sample_reference(h, sched, key, z, settings)
    return ours

  jitted = jax.jit(fn)
  return lambda *args: jitted(state, *args)


class DiffusionLossTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # 8 images x 4 tokens x 32 copies = 1024 rows > 1000 network steps.
      dict(testcase_name='table', batch=8, mul=32, drop=0.3, use_vb=True),
      dict(testcase_name='direct', batch=3, mul=2, drop=0.3, use_vb=True),
      dict(testcase_name='direct_no_drop_no_vb', batch=3, mul=2, drop=0.0,
           use_vb=False),
  )
  def test_equals_rowwise_reference(self, batch, mul, drop, use_vb):
    head = _head()
    sched = _schedule('')
    z = jax.random.normal(jax.random.key(10), (batch, 6))
    target = jax.random.normal(jax.random.key(11), (batch, 16))
    settings = gendd.LossSettings(4, mul, drop, use_vb)
    key = jax.random.key(12)
    (loss, mse, vb), ref = _loss_fn(head, sched, settings, True)(key, z,
                                                                 target)
    self.assertEqual(loss.shape, ())
    self.assertTrue(np.isfinite(float(loss)))
    for name, got, want in zip(('loss', 'mse', 'vb'), (loss, mse, vb), ref):
      _assert_close(got, want, 2e-5, name)
    if use_vb:
      _assert_close(loss, mse + vb, 1e-6)
    else:
      self.assertEqual(float(vb), 0.0)
      self.assertEqual(float(loss), float(mse))

  def test_respaced_schedule_equals_rowwise_reference(self):
    # A respaced schedule feeds the original timesteps (up to 999) to the
    # network through `timestep_map`; 3 x 4 x 2 = 24 rows exceed its 10
    # steps, so `diffusion_loss` takes its time-embedding table path.
    head = _head()
    sched = _schedule('10')
    z = jax.random.normal(jax.random.key(10), (3, 6))
    target = jax.random.normal(jax.random.key(11), (3, 16))
    settings = gendd.LossSettings(4, 2, 0.3, True)
    key = jax.random.key(12)
    ours, ref = _loss_fn(head, sched, settings, True)(key, z, target)
    _assert_close(ours[0], ref[0], 2e-5, 'loss')

  def test_gradients_match_rowwise_reference(self):
    head = _head()
    sched = _schedule('')
    z = jax.random.normal(jax.random.key(20), (8, 6))
    target = jax.random.normal(jax.random.key(21), (8, 16))
    settings = gendd.LossSettings(4, 32, 0.3, True)
    key = jax.random.key(22)
    graphdef, params = nnx.split(head)

    def ours(p, zz):
      return gendd.diffusion_loss(nnx.merge(graphdef, p), sched, key, zz,
                                  target, settings)[0]

    def ref(p, zz):
      return _rows_reference(nnx.merge(graphdef, p), sched, key, zz, target,
                             settings)[0]

    g_ours, g_ref = jax.jit(lambda p, zz: (
        jax.grad(ours, argnums=(0, 1))(p, zz),
        jax.grad(ref, argnums=(0, 1))(p, zz)))(params, z)
    leaves = jax.tree_util.tree_leaves_with_path(g_ours)
    self.assertLen(leaves, len(jax.tree.leaves(g_ref)))
    for (path, a), b in zip(leaves, jax.tree.leaves(g_ref)):
      _assert_close(a, b, 1e-4, jax.tree_util.keystr(path))
    self.assertGreater(float(jnp.abs(g_ours[1]).max()), 0.0)  # z matters.

  def test_full_cond_drop_makes_loss_independent_of_z(self):
    head = _head()
    sched = _schedule('')
    target = jax.random.normal(jax.random.key(1), (4, 16))
    key = jax.random.key(2)
    z1, z2 = (jax.random.normal(jax.random.key(s), (4, 6)) for s in (3, 4))
    graphdef, state = nnx.split(head)
    settings = gendd.LossSettings(4, 2, 1.0, True)

    def loss(zz, drop):
      return gendd.diffusion_loss(
          nnx.merge(graphdef, state), sched, key, zz, target,
          settings._replace(cond_drop_prob=drop))[0]

    @jax.jit
    def fn(z1, z2):
      return (loss(z1, 1.0), loss(z2, 1.0), jax.grad(loss)(z1, 1.0),
              loss(z1, 0.0), loss(z2, 0.0))

    dropped1, dropped2, grad_z, kept1, kept2 = fn(z1, z2)
    self.assertEqual(float(dropped1), float(dropped2))
    np.testing.assert_array_equal(grad_z, 0.0)
    # Without dropout the condition matters (so the checks above can fail).
    self.assertNotEqual(float(kept1), float(kept2))

  def test_rejects_non_divisor_token_dim(self):
    with self.assertRaisesRegex(ValueError, 'token_dim 4'):
      gendd.diffusion_loss(_head(), _schedule(''), jax.random.key(0),
                           jnp.zeros((2, 6)), jnp.zeros((2, 15)),
                           gendd.LossSettings(4, 1, 0.0))


class SampleFeaturesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name='cold_clipped', cfg=1.5, temperature=0.5, num=1,
           clip=1.0),
      dict(testcase_name='greedy', cfg=1.0, temperature=0.0, num=1,
           clip=None),
      dict(testcase_name='averaged', cfg=1.0, temperature=1.0, num=3,
           clip=None),
      dict(testcase_name='cold_start', cfg=2.0, temperature=0.0, num=1,
           clip=None, init=0.5),
  )
  def test_equals_rowwise_p_sample_loop(self, cfg, temperature, num, clip,
                                        init=1.0):
    head = _head(seed=3)
    sched = _schedule('8')
    z = jax.random.normal(jax.random.key(30), (2, 6))
    settings = gendd.SampleSettings(4, num, cfg, temperature, clip,
                                    init_temperature=init)
    key = jax.random.key(31)
    out, draws = _sample_fn(head, sched, settings, True)(key, z)
    self.assertEqual(out.shape, (2, 16))
    self.assertTrue(np.all(np.isfinite(np.asarray(out))))
    self.assertEqual(draws.shape, (num, 2, 16))
    _assert_close(out, jnp.mean(draws, 0), 1e-4)
    if num > 1:  # The average is over genuinely different draws.
      self.assertGreater(float(jnp.abs(draws[0] - draws[1]).max()), 1e-2)

  @parameterized.named_parameters(
      # The 'greedy' case above matches a chain with zero step noise: show
      # that the noise matters, so that match is not vacuous.
      dict(testcase_name='temperature', field='temperature', a=0.0, b=1.0),
      # Likewise the unconditional branch is used for scales other than 1.
      dict(testcase_name='cfg_scale', field='cfg_scale', a=1.0, b=3.0),
      dict(testcase_name='init_temperature', field='init_temperature', a=0.0,
           b=1.0),
  )
  def test_setting_matters(self, field, a, b):
    head = _head(seed=3)
    sched = _schedule('8')
    z = jax.random.normal(jax.random.key(30), (2, 6))
    key = jax.random.key(31)
    base = gendd.SampleSettings(4, 1, 1.0, 1.0, None)
    graphdef, state = nnx.split(head)

    @jax.jit
    def fn(st, zz):
      h = nnx.merge(graphdef, st)
      return [gendd.sample_features(h, sched, key, zz,
                                    base._replace(**{field: v}))
              for v in (a, b)]

    out_a, out_b = fn(state, z)
    self.assertGreater(float(jnp.abs(out_a - out_b).max()), 1e-3)

  def test_no_noise_at_all_is_deterministic(self):
    # Temperature 0 and x_T scale 0: the same feature whatever the key (and
    # every draw of an image equal), which either noise alone does not give.
    head = _head(seed=3)
    sched = _schedule('8')
    z = jax.random.normal(jax.random.key(30), (2, 6))
    graphdef, state = nnx.split(head)

    @jax.jit
    def fn(st, key, temperature, init):
      h = nnx.merge(graphdef, st)
      settings = gendd.SampleSettings(4, 2, 2.0, temperature, None,
                                      init_temperature=init)
      return gendd.sample_features(h, sched, key, z, settings)

    keys = jax.random.key(1), jax.random.key(2)
    a, b = (fn(state, k, 0.0, 0.0) for k in keys)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for temperature, init in ((1.0, 0.0), (0.0, 1.0)):
      a, b = (fn(state, k, temperature, init) for k in keys)
      self.assertGreater(float(jnp.abs(a - b).max()), 1e-3)


class ClassificationLossTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.logits = jax.random.normal(jax.random.key(0), (6, 5)) * 3
    self.labels = jnp.array([0, 4, 2, 2, 1, 3])

  def test_int_labels_equal_soft_one_hot(self):
    np.testing.assert_allclose(
        gendd.cross_entropy(self.logits, self.labels),
        gendd.cross_entropy(self.logits, jax.nn.one_hot(self.labels, 5)),
        rtol=1e-6)

  def test_matches_numpy(self):
    logits = np.asarray(self.logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -logp[np.arange(6), np.asarray(self.labels)].mean()
    np.testing.assert_allclose(gendd.cross_entropy(self.logits, self.labels),
                               want, rtol=1e-5)

  def test_mask_excludes_rows(self):
    mask = jnp.array([1, 0, 1, 0, 0, 1], bool)
    rows = np.flatnonzero(np.asarray(mask))
    np.testing.assert_allclose(
        gendd.cross_entropy(self.logits, self.labels, mask),
        gendd.cross_entropy(self.logits[rows], self.labels[rows]), rtol=1e-6)
    # Changing a masked-out label changes nothing.
    other = self.labels.at[1].set(0)
    self.assertEqual(
        float(gendd.cross_entropy(self.logits, self.labels, mask)),
        float(gendd.cross_entropy(self.logits, other, mask)))

  def test_empty_mask_gives_zero(self):
    self.assertEqual(float(gendd.cross_entropy(
        self.logits, self.labels, jnp.zeros(6, bool))), 0.0)

  def test_kl_zero_for_equal_logits(self):
    self.assertAlmostEqual(
        float(gendd.distill_kl(self.logits, self.logits, 4.0)), 0.0,
        delta=1e-6)

  def test_kl_positive_otherwise(self):
    other = jax.random.normal(jax.random.key(1), (6, 5))
    self.assertGreater(float(gendd.distill_kl(self.logits, other, 4.0)), 1e-3)

  @parameterized.parameters(1.0, 2.0, 4.0)
  def test_kl_definition(self, temperature):
    s = np.asarray(jax.random.normal(jax.random.key(1), (6, 5)), np.float64)
    t = np.asarray(self.logits, np.float64)

    def log_softmax(x):
      x = x / temperature
      return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl = (np.exp(log_softmax(t)) * (log_softmax(t) - log_softmax(s))).sum(-1)
    want = temperature ** 2 * kl.mean()
    got = gendd.distill_kl(jnp.asarray(s, jnp.float32),
                           jnp.asarray(t, jnp.float32), temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The T^2 factor: equals the T = 1 KL of the scaled logits times T^2.
    scaled = gendd.distill_kl(jnp.asarray(s / temperature, jnp.float32),
                              jnp.asarray(t / temperature, jnp.float32), 1.0)
    np.testing.assert_allclose(got, temperature ** 2 * scaled, rtol=1e-5)


class ParseClipTest(absltest.TestCase):

  def test_settings(self):
    self.assertIsNone(gendd.parse_clip_x0('none'))
    self.assertIsNone(gendd.parse_clip_x0(''))
    self.assertEqual(gendd.parse_clip_x0('data'), 'data')
    self.assertEqual(gendd.parse_clip_x0('2.5'), 2.5)
    self.assertEqual(gendd.parse_clip_x0(3), 3.0)
    with self.assertRaisesRegex(ValueError, "'none', 'data', a number"):
      gendd.parse_clip_x0('sometimes')

  def test_dynamic(self):
    th = gendd.parse_clip_x0('dynamic')
    self.assertEqual(th, diffusion.Threshold(99.5, True, 1.0))
    self.assertEqual(gendd.parse_clip_x0('dynamic_clip:90'),
                     diffusion.Threshold(90.0, False, 1.0))
    self.assertEqual(gendd.with_bound(th, 3.0).bound, 3.0)
    self.assertEqual(gendd.with_bound(2.0, 3.0), 2.0)
    for bad in ('dynamic:0', 'dynamic:101', 'dynamic:x', 'dynamic_clip:'):
      with self.assertRaisesRegex(ValueError, 'percentile', msg=bad):
        gendd.parse_clip_x0(bad)


if __name__ == '__main__':
  absltest.main()
