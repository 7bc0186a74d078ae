"""The benchmark runs and reports positive rates (no timing assertions), and
counts work correctly."""

import os
import shutil
import sys
import tempfile
import types

from absl.testing import absltest
import jax
import jax.numpy as jnp

from benchmarks import bench
from benchmarks import bench_reference
from benchmarks import bench_tiny
from gendd_jax import diffusion
from gendd_jax import gendd
from tests import testing


class WorkCountTest(absltest.TestCase):

  def test_dot_general_with_batch_dims(self):
    jaxpr = jax.make_jaxpr(lambda a, b: jnp.einsum('bij,bjk->bik', a, b))(
        jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
    self.assertEqual(bench.matmul_flops(jaxpr), 2 * 2 * 3 * 4 * 5)

  def test_scan_body_counts_per_iteration(self):
    def f(x, w):
      return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=7)[0]
    jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 4)), jnp.ones((4, 4)))
    self.assertEqual(bench.matmul_flops(jaxpr), 7 * 2 * 3 * 4 * 4)

  def test_convolution_and_its_gradients(self):
    x = jnp.ones((2, 8, 8, 3))
    w = jnp.ones((3, 3, 3, 5))

    def conv(x, w, stride):
      return jax.lax.conv_general_dilated(
          x, w, (stride, stride), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    for stride in (1, 2):
      out = 8 // stride
      fwd = 2 * (2 * out * out * 5) * (3 * 3 * 3)
      self.assertEqual(bench.matmul_flops(
          jax.make_jaxpr(lambda x, w, s=stride: conv(x, w, s))(x, w)), fwd)
      # Input and weight gradients each cost about one forward pass (the
      # zero taps of the input-dilated transpose are not counted).
      grads = jax.make_jaxpr(jax.grad(
          lambda x, w, s=stride: jnp.sum(conv(x, w, s)), (0, 1)))(x, w)
      self.assertBetween(bench.matmul_flops(grads), 2.5 * fwd, 3.5 * fwd)

  def test_cond_counts_costliest_branch(self):
    def f(p, x):
      return jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)
    jaxpr = jax.make_jaxpr(f)(True, jnp.ones((4, 4)))
    self.assertEqual(bench.matmul_flops(jaxpr), 2 * 2 * 4 * 4 * 4)

  def test_compiled_op_flops_and_profile(self):
    def f(x, w, k):
      y = jax.lax.conv_general_dilated(
          x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.tanh(y.reshape(2, -1) @ w)

    args = (jnp.ones((2, 4, 4, 3)), jnp.ones((4 * 4 * 5, 7)),
            jnp.ones((3, 3, 3, 5)))
    jitted = jax.jit(f)
    ops = bench.hlo_op_flops(jitted.lower(*args).compile().as_text())
    want = 2 * (2 * 4 * 4 * 5 * 27) + 2 * (2 * 80 * 7)
    self.assertEqual(sum(v[0] for v in ops.values()), want)
    self.assertEqual(sorted(v[2] for v in ops.values()), ['conv', 'dot'])
    with tempfile.TemporaryDirectory() as trace_dir:
      prof = bench.profile_call(jitted, args, trace_dir)
    self.assertGreater(prof['matmul_seconds'], 0.0)
    self.assertAlmostEqual(prof['op_seconds'], prof['matmul_seconds'] +
                           prof['other_seconds'])
    self.assertTrue(prof['top_matmul'])

  def test_peak_and_ratios(self):
    peak = bench.matmul_peak(shapes=((32, 16, 8),), repeats=1,
                              chain_flops=1e6)
    self.assertGreater(peak['gflops_per_sec'], 0.0)
    self.assertEqual(peak['shapes'][0]['shape'], [32, 16, 8])
    ours = dict(train=dict(images_per_sec=6.0, gflops_per_sec=2.0),
                eval=dict(images_per_sec=3.0),
                eval_sampling=dict(images_per_sec=4.0),
                few_step=dict(a=dict(images_per_sec=50.0, gflops_per_sec=1.0),
                              b=dict(images_per_sec=10.0)))
    theirs = dict(train=dict(images_per_sec=2.0, gflops_per_sec=1.0),
                  eval=dict(images_per_sec=2.0))
    self.assertEqual(bench.ratios(ours, theirs),
                     {'train': 3.0, 'eval': 2.0, 'eval_step': 1.5,
                      'few_step/a': 25.0, 'few_step/b': 5.0})
    result = dict(ours, reference=theirs)
    bench._annotate_peak(result, 4.0)
    self.assertEqual(result['train']['pct_of_peak'], 50.0)
    self.assertEqual(result['few_step']['a']['pct_of_peak'], 25.0)
    self.assertEqual(theirs['train']['pct_of_peak'], 25.0)

  def test_few_step_settings(self):
    digits, cifar_style = (dict((f.name, f) for f in bench.FEW_STEP)[k]
                           for k in ('digits_choice', 'cifar_style_choice'))
    # The studies' choices: 4 guided steps (8 calls), 4 unguided ones.
    self.assertEqual(digits.network_calls(), 8)
    self.assertEqual(cifar_style.network_calls(), 4)
    self.assertEqual(bench.FEW_STEP[0].network_calls(), 2)
    base = gendd.SampleSettings(16)
    s = cifar_style.settings(base, 3.0)
    self.assertEqual((s.cfg_scale, s.temperature, s.init_temperature),
                     (1.0, 0.0, 0.0))
    self.assertIsInstance(s.clip_x0, diffusion.Threshold)
    self.assertEqual(s.clip_x0.bound, 3.0)
    data = bench.FewStep('x', 'ancestral', '8', clip_x0='data')
    self.assertEqual(data.settings(base, 3.0).clip_x0, 3.0)
    self.assertIsNone(bench.FEW_STEP[0].settings(base, 3.0).clip_x0)
    self.assertEqual(digits.describe(),
                     'ancestral trailing4, deterministic, CFG 2, clip dynamic')


class TableTest(absltest.TestCase):

  def test_summary_table_rows(self):
    part = dict(images_per_sec=4.0, gflop_per_image=2.0, gflops_per_sec=8.0,
                pct_of_peak=50.0)
    result = dict(
        peak=dict(gflops_per_sec=16.0),
        cifar=dict(train=part, eval=part, eval_sampling=part,
                   few_step=dict(ddim2=dict(
                       part, images_per_sec=40.0, setting=bench.FewStep(
                           'ddim2', 'ddim', '2', 1.0).record())),
                   setting=dict(sampling_steps='100'),
                   reference=dict(train=part, eval=part),
                   ratio={'train': 1.0, 'eval': 1.0, 'eval_step': 1.0,
                          'few_step/ddim2': 10.0}),
        head_only=dict(train=part, eval=part))
    lines = bench.summary_table(result).splitlines()
    self.assertLen([x for x in lines if x.startswith('| cifar')], 4)
    fast = [x for x in lines
            if '| cifar | ddim 2, noisy, CFG 1, clip none (2 calls) vs their '
            '100 steps |' in x]
    self.assertLen(fast, 1)
    self.assertIn('| 40.00 | 4.00 | 10.00x |', fast[0])
    self.assertLen([x for x in lines if x.startswith('| head_only')], 2)
    self.assertIn('| 4.00 | 4.00 | 1.00x | 2.0 | 2.0 | 8 (50%) | 8 (50%) |',
                  lines[2])
    self.assertIn('16 GFLOP/s', lines[-1])


class TinyBenchTest(absltest.TestCase):
  """`bench_tiny`: every config file is an entry; one real run is timed
  and its table row says whether it met the limit."""

  def test_entries_and_table(self):
    entries = bench_tiny.config_entries()
    configs = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'configs')
    self.assertEqual(sorted(entries), sorted(
        f[:-3] for f in os.listdir(configs) if f.endswith('.py')))
    run = bench_tiny.run_one('digits:quick', fast_compile=True)
    self.assertEqual(run['returncode'], 0, run['last_lines'])
    self.assertGreater(run['seconds'], 0.0)
    slow = dict(run, config='x', seconds=run['seconds'] + 100.0)
    failed = dict(run, config='y', returncode=2)
    text = bench_tiny.markdown(dict(
        command='c', machine='m', jax='j', fast_compile=True,
        limit_seconds=run['seconds'] + 50.0, runs=[run, slow, failed]))
    self.assertIn(f"| `configs/digits.py:quick,tiny` | {run['seconds']:.1f} "
                  '| yes | 0 |', text)
    # Over the limit, or failed: not within it.
    self.assertRegex(text, r'\| `configs/x.py:tiny` \| [0-9.]+ \| no \| 0 \|')
    self.assertRegex(text, r'\| `configs/y.py:tiny` \| [0-9.]+ \| no \| 2 \|')


class BenchTest(absltest.TestCase):

  def test_head_only_small(self):
    out = bench.bench_head_only(1, 1, feature_dim=64, token_dim=16, width=32,
                                depth=1, mul=2, batch=4, sampling_steps='4')
    self.assertEqual(out['setting']['feature_dim'], 64)
    few = out['few_step']
    self.assertEqual(set(few), {f.name for f in bench.FEW_STEP})
    for part in [out['train'], out['eval'], *few.values()]:
      self.assertGreater(part['images_per_sec'], 0.0)
      self.assertLessEqual(part['min'], part['max'])
      self.assertGreater(part['gflop_per_image'], 0.0)
    # Training: the head's rows (2 copies x 4 images x 4 tokens) each cost
    # at least three passes of its width-32 products.
    self.assertGreater(out['train']['gflop_per_image'] * 1e9,
                       3 * 2 * 4 * 2 * 5 * 32 * 32)
    self.assertGreater(out['train']['xla_gflop_per_image'], 0.0)
    # Guided, work is in proportion to the steps: one posterior-mean step,
    # or four trailing ones, against four ancestral steps.
    ev = out['eval']['gflop_per_image']
    self.assertAlmostEqual(few['posterior_mean']['gflop_per_image'], ev / 4,
                           delta=0.05 * ev)
    self.assertAlmostEqual(few['digits_choice']['gflop_per_image'], ev,
                           delta=0.05 * ev)
    # Unguided, less than guided but more than half: the guided sampler's
    # unconditional branch shares its modulations across images.
    self.assertBetween(few['cifar_style_choice']['gflop_per_image'],
                       0.55 * ev, 0.95 * ev)

  def test_digits(self):
    out = bench.bench_digits(1, 1)
    # The config's default sampler (configs/digits.py).
    self.assertEqual(out['setting']['sampling_steps'], 'trailing4')
    for part in ('train', 'eval'):
      self.assertGreater(out[part]['images_per_sec'], 0.0)

  def test_cifar_small(self):
    # The CIFAR setting's code path (BatchNorm teacher and student) at a
    # small size; the full-size figures come from `python -m benchmarks.bench`.
    out = bench.bench_cifar(1, 1, teacher='resnet8', student='resnet8',
                            batch=8, eval_batch=8, width=32, depth=1, mul=2,
                            sampling_steps='4')
    self.assertEqual(out['setting']['teacher'], 'resnet8')
    few = out['few_step']
    for part in [out['train'], out['eval'], out['eval_sampling'],
                 *few.values()]:
      self.assertGreater(part['images_per_sec'], 0.0)
    # posterior_mean: one network call per branch instead of four steps
    # (the student's convolutions dominate at this size); four unguided
    # steps: half the calls of four guided ones.
    self.assertLess(few['posterior_mean']['gflop_per_image'],
                    out['eval_sampling']['gflop_per_image'])
    self.assertLess(few['cifar_style_choice']['gflop_per_image'],
                    few['digits_choice']['gflop_per_image'])
    # The trainer's evaluation also runs the teacher: more work.
    self.assertGreater(out['eval']['gflop_per_image'],
                       out['eval_sampling']['gflop_per_image'])
    pre = bench.bench_cifar(1, 1, teacher='resnet8', student='resnet8',
                            batch=8, eval_batch=0, width=32, depth=1, mul=2,
                            sampling_steps='4', precomputed=True)
    self.assertEqual(pre['setting']['teacher_source'], 'precomputed')
    self.assertGreater(pre['train']['images_per_sec'], 0.0)
    # No teacher forward: less work per image.
    self.assertLess(pre['train']['gflop_per_image'],
                    out['train']['gflop_per_image'])


def _stand_in_copy(parent: str, tag: str) -> str:
  """A directory shaped like the authors' CIFAR code, whose `models` says
  which copy it is."""
  root = os.path.join(parent, tag, 'GenDD_cifar')
  for sub in ('models', 'diffusion'):
    os.makedirs(os.path.join(root, sub))
    with open(os.path.join(root, sub, '__init__.py'), 'w') as f:
      f.write(f'DiffModel = {tag!r}\nmodel_dict = {{}}\n' if sub == 'models'
              else '')
  with open(os.path.join(root, 'diffloss.py'), 'w') as f:
    f.write('import diffusion\n')
  return os.path.dirname(root)


class LoadTest(absltest.TestCase):
  """Which copy of the authors' code `load` imports (no real copy needed)."""

  def setUp(self):
    super().setUp()
    saved = {n: m for n, m in sys.modules.items()
             if n.split('.')[0] in bench_reference._MODULES}
    path = list(sys.path)
    loaded = set(bench_reference._LOADED)

    def restore():
      for n in [n for n in sys.modules
                if n.split('.')[0] in bench_reference._MODULES]:
        del sys.modules[n]
      sys.modules.update(saved)
      sys.path[:] = path
      bench_reference._LOADED.clear()
      bench_reference._LOADED.update(loaded)
    self.addCleanup(restore)
    for n in saved:  # Each test starts with no copy imported.
      del sys.modules[n]
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = tmp.name

  def test_a_second_copy_replaces_the_first(self):
    a = bench_reference.load(_stand_in_copy(self.tmp, 'a'))
    self.assertEqual(a.DiffModel, 'a')
    import diffloss  # pylint: disable=g-import-not-at-top,import-error
    self.assertIn(os.path.join('a', 'GenDD_cifar'), diffloss.__file__)
    b = bench_reference.load(_stand_in_copy(self.tmp, 'b'))
    self.assertEqual(b.DiffModel, 'b')
    self.assertNotIn(a.root, sys.path)
    self.assertNotIn('diffloss', sys.modules)  # a's, dropped
    # Loading the same copy again keeps its modules.
    self.assertIs(bench_reference.load(b.root).DiffModel, b.DiffModel)

  def test_a_deleted_earlier_copy_is_still_replaced(self):
    first = _stand_in_copy(self.tmp, 'gone')
    bench_reference.load(first)
    shutil.rmtree(first)
    self.assertEqual(bench_reference.load(_stand_in_copy(self.tmp, 'b'))
                     .DiffModel, 'b')

  def test_a_foreign_module_of_the_same_name_is_an_error(self):
    foreign = types.ModuleType('models')
    foreign.__file__ = os.path.join(self.tmp, 'mine', 'models', '__init__.py')
    sys.modules['models'] = foreign
    with self.assertRaisesRegex(ImportError, "not a copy of the authors' code"):
      bench_reference.load(_stand_in_copy(self.tmp, 'a'))
    self.assertIs(sys.modules['models'], foreign)

  def test_no_copy_is_an_error(self):
    with self.assertRaisesRegex(FileNotFoundError, 'GenDD_cifar/diffloss.py'):
      bench_reference.load(self.tmp)


class ReferenceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not testing.has_reference():
      self.skipTest("no copy of the authors' code at "
                    f'{testing.REFERENCE} (set GENDD_REFERENCE)')

  def test_head_only_small_with_reference(self):
    ref = bench_reference.load(testing.REFERENCE)
    self.assertGreaterEqual(bench_reference.set_threads(ref, 1), 1)
    out = bench.bench_head_only(1, 1, feature_dim=64, token_dim=16, width=32,
                                depth=1, mul=2, batch=4, sampling_steps='4',
                                reference=ref)
    theirs = out['reference']
    for part in ('train', 'eval'):
      self.assertGreater(theirs[part]['images_per_sec'], 0.0)
      self.assertEqual(theirs[part]['flops_linearity_error'], 0.0)
      # They embed the timestep and condition per row: more work than ours.
      self.assertGreater(theirs[part]['gflop_per_image'],
                         out[part]['gflop_per_image'])
    self.assertEqual(set(bench.ratios(out, theirs)),
                     {'train', 'eval'} |
                     {f'few_step/{f.name}' for f in bench.FEW_STEP})


if __name__ == '__main__':
  absltest.main()
