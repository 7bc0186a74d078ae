"""The training system: stages, resume, sharding and the optimizer.

Runs the bundled digits example (`configs/digits.py:quick`) shrunk further,
on CPU. The sharding test starts a subprocess with eight simulated CPU
devices (XLA_FLAGS must be set before JAX starts).
"""

import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import data as data_lib
from gendd_jax import optim
from gendd_jax import reporting
from gendd_jax import settings
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
from gendd_jax import train
from gendd_jax.errors import ConfigError
import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setUpModule():
  testing.set_up_module()


def tearDownModule():
  testing.tear_down_module()


def _weights(workdir):
  """The model part of a run's export (parameters and batch statistics)."""
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'export', 'weights'))['model']


def _final_state(workdir):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    return ckpt.latest_step(), ckpt.restore(None)[0]
  finally:
    ckpt.close()


class _Interrupt(Exception):
  pass


class StageTest(parameterized.TestCase):

  def test_teacher_loss_falls(self):
    config = testing.small_config('teacher', epochs=4)
    d = config.data
    train_split, test_split, info = data_lib.create_splits(
        d.name, fold=0, num_folds=d.num_folds,
        label_fraction=d.label_fraction, seed=config.seed)
    batches = data_lib.TrainBatches(train_split, d.batch_size, config.seed)
    mesh = sharding.create_mesh(1)
    module = stages.get('teacher').create_model(config, info)
    s = settings.step_settings(config, 'teacher', batches.steps_per_epoch)
    ospec = s.optim
    train_step, eval_step = train.jitted_steps(s, mesh)
    state = train.create_train_state(module, ospec, mesh)
    losses = []
    for step in range(ospec.total_steps):
      batch = sharding.shard_batch(
          stages.get('teacher').visible(batches.batch(step)), mesh)
      state, metrics = train_step(state, teacher_lib.Teacher(), batch)
      losses.append(float(metrics['loss']))
    self.assertEqual(ospec.total_steps, 28)
    self.assertEqual(int(state.step), 28)
    self.assertTrue(np.all(np.isfinite(losses)))
    # 10 classes: the first loss is near log(10) = 2.3.
    self.assertGreater(losses[0], 2.0)
    # Measured: 2.33 -> ~1.15 over 28 steps (epoch means 2.08, 1.52, 1.24,
    # 1.14).
    epoch_means = np.asarray(losses).reshape(4, 7).mean(1)
    self.assertTrue(np.all(np.diff(epoch_means) < 0), epoch_means)
    self.assertLess(np.mean(losses[-3:]), 0.6 * losses[0])
    res = train.evaluate(eval_step, state, teacher_lib.Teacher(),
                         data_lib.eval_batches(test_split, d.eval_batch_size),
                         mesh)
    self.assertEqual(set(res['accuracy']), {'acc'})
    self.assertGreater(res['accuracy']['acc'], 60.0)  # Chance: 10%.
    self.assertLen(res['predictions']['acc'], len(test_split))

  def test_teacher_run_writes_results_and_export(self):
    export, res = testing.teacher_export()
    self.assertEqual(res['stage'], 'teacher')
    self.assertEqual(res['steps'], 28)
    self.assertGreater(res['accuracy']['acc'], 60.0)  # Chance: 10%.
    with open(os.path.join(os.path.dirname(export), 'results.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['accuracy'], res['accuracy'])
    meta = ckpt_lib.load_export_meta(export)
    self.assertEqual(meta['stage'], 'teacher')
    self.assertEqual(meta['num_classes'], 10)
    # Every test image once, predictions aligned with labels.
    self.assertLen(res['predictions']['acc'], len(res['labels']))
    self.assertLen(set(res['index']), len(res['index']))

  def test_fixed_epoch_length(self):
    # `data.steps_per_epoch` sets the schedules' epoch (the released CC3M
    # runs count 5,501 steps as one); 0 is one pass (7 steps here).
    config = testing.small_config('teacher', epochs=2)
    config.data.steps_per_epoch = 3
    res = train.train_and_evaluate(config, testing.workdir('epoch_len'),
                                   quiet=True)
    self.assertEqual(res['steps'], 6)
    config.data.steps_per_epoch = -1
    with self.assertRaisesRegex(ConfigError, 'steps_per_epoch'):
      train.train_and_evaluate(config, testing.workdir('epoch_len_bad'),
                               quiet=True)

  def test_periodic_evaluation(self):
    config = testing.small_config('teacher', epochs=2)
    config.eval_every_steps = 5  # 14 steps: evaluations at 5 and 10.
    res = train.train_and_evaluate(config, testing.workdir('periodic'),
                                   quiet=True)
    self.assertEqual([h['step'] for h in res['periodic_eval']], [5, 10])
    # Measured: 66.7% after 5 steps, 78.5% after 10 (chance: 10%).
    for h in res['periodic_eval']:
      self.assertGreater(h['accuracy']['acc'], 30.0, h['step'])
    self.assertGreater(res['periodic_eval'][1]['accuracy']['acc'],
                       res['periodic_eval'][0]['accuracy']['acc'])

  def test_periodic_evaluation_of_gendd_is_cheap_and_on_a_subset(self):
    config = testing.gendd_config()
    config.checkpoint_every_steps = 0
    config.eval_every_steps = 7  # 14 steps: one evaluation, at 7.
    config.eval_subset_batches = 1
    lines = []
    with mock.patch('builtins.print', lambda *a, **k: lines.append(
        ' '.join(map(str, a)))):
      res = train.train_and_evaluate(config, testing.workdir('periodic_g'))
    h, = res['periodic_eval']
    self.assertEqual(h['step'], 7)
    self.assertEqual(h['examples'], config.data.eval_batch_size)
    self.assertEqual(set(h['accuracy']), {'sampled_acc', 'probe_acc'})
    # The final evaluation covers the whole split with the configured
    # sampler (4-step ancestral), not the one-step posterior mean.
    self.assertGreater(len(res['labels']), config.data.eval_batch_size)
    text = '\n'.join(lines)
    self.assertIn(f'[gendd] eval at step 7 ({config.data.eval_batch_size} '
                  'examples): ', text)
    self.assertRegex(text, r'\[gendd\] wall-time estimate: [\d.]+ steps/s '
                     r'over steps 1-11, so about 0:00:\d\d for the remaining '
                     r'3 steps')
    periodic = settings.periodic_eval_settings(
        settings.step_settings(config, 'gendd', 7))
    self.assertEqual((periodic.sample.sampler, periodic.sampling_steps,
                      periodic.sample.num_sampling), ('posterior_mean', '1', 1))

  def test_logged_metrics_are_interval_means(self):
    means = reporting.IntervalMeans()
    for i in range(4):
      means.add(dict(loss=jnp.float32(i), lr=jnp.float32(10 - i),
                     nonfinite=jnp.int32(i % 2)))
    self.assertEqual(means.pop(), dict(loss=1.5, lr=7.0, nonfinite=2.0))
    means.add(dict(loss=jnp.float32(5.0), lr=jnp.float32(1.0),
                   nonfinite=jnp.int32(0)))
    self.assertEqual(means.pop()['loss'], 5.0)

  def test_gendd_end_to_end(self):
    workdir, res = testing.gendd_run()
    self.assertEqual(set(res['accuracy']), {'sampled_acc', 'probe_acc'})
    # 14 steps with a 4-step sampler do not beat chance (10%): the values
    # are the recorded ones of this deterministic run (87 and 107 of 899
    # test images), within 1 point for other CPUs' rounding.
    recorded = dict(sampled_acc=9.677, probe_acc=11.902)
    for name, acc in res['accuracy'].items():
      self.assertAlmostEqual(acc, recorded[name], delta=1.0, msg=name)
      self.assertLen(res['predictions'][name], len(res['labels']))
      self.assertAlmostEqual(
          acc, 100.0 * np.mean(np.asarray(res['predictions'][name]) ==
                               np.asarray(res['labels'])), delta=1e-9)
    for name in ('results.json', 'export/meta.json'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    w = _weights(workdir)['params']
    self.assertSameElements(w, ('backbone', 'cls_projector', 'head'))
    # The export also carries the teacher classifier that classifies samples.
    exported = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, 'export', 'weights'))
    self.assertSameElements(exported, ('model', 'classifier'))
    self.assertEqual(exported['classifier']['weight'].shape, (10, 64))

  def test_gendd_unsup_uses_no_labels(self):
    batch = dict(image=np.zeros((2, 64), np.float32),
                 label=np.zeros(2, np.int32), label_mask=np.ones(2, bool))
    for stage in ('gendd_unsup', 'kl'):
      self.assertEqual(set(stages.get(stage).visible(batch)), {'image'})
    self.assertEqual(set(stages.get('teacher').visible(batch)),
                     {'image', 'label'})
    self.assertEqual(set(stages.get('gendd').visible(batch)),
                     {'image', 'label', 'label_mask'})
    seen = []
    original = stages.Stage.visible

    def spy(stage, b):
      out = original(stage, b)
      seen.append(set(out))
      return out

    config = testing.gendd_config('gendd_unsup')
    config.stages.gendd_unsup.epochs = 3 / 7
    # Also covers the second, x0-clipped sampler of the evaluation.
    config.sampler.also_eval_clipped = True
    with mock.patch.object(stages.Stage, 'visible', spy):
      res = train.train_and_evaluate(config, testing.workdir('gendd_unsup'),
                                     quiet=True)
    self.assertEqual(seen, [{'image'}] * 3)
    # No probe: nothing was trained on labels.
    self.assertEqual(set(res['accuracy']), {'sampled_acc', 'sampled_clip_acc'})
    # Three steps cannot beat chance (10%): the recorded value of this
    # deterministic run (88 of 899 test images, both samplers), within 1
    # point for other CPUs' rounding.
    for name, acc in res['accuracy'].items():
      self.assertAlmostEqual(acc, 9.789, delta=1.0, msg=name)

  def test_resume_equals_uninterrupted_run(self):
    dir_a, res_a = testing.gendd_run()
    dir_b = testing.workdir('gendd_b')
    original = data_lib.TrainBatches.batch
    steps = []

    def crash_at_7(batches, step):
      if step == 7:  # As if the process died while training step 7.
        raise _Interrupt()
      steps.append(step)
      return original(batches, step)

    with mock.patch.object(data_lib.TrainBatches, 'batch', crash_at_7):
      with self.assertRaises(_Interrupt):
        train.train_and_evaluate(testing.gendd_config(), dir_b, quiet=True)
    self.assertEqual(steps, list(range(7)))
    latest, _ = _final_state(dir_b)
    self.assertEqual(latest, 5)  # Steps 5 and 6 are lost and redone.
    self.assertFalse(os.path.exists(os.path.join(dir_b, 'results.json')))

    steps.clear()

    def record(batches, step):
      steps.append(step)
      return original(batches, step)

    with mock.patch.object(data_lib.TrainBatches, 'batch', record):
      res_b = train.train_and_evaluate(testing.gendd_config(), dir_b,
                                       quiet=True)
    self.assertEqual(steps, list(range(5, 14)))

    # Bit-for-bit on CPU: weights, optimizer state, predictions.
    step_a, state_a = _final_state(dir_a)
    step_b, state_b = _final_state(dir_b)
    self.assertEqual((step_a, step_b), (14, 14))
    leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
    leaves_b = jax.tree.leaves(state_b)
    self.assertLen(leaves_b, len(leaves_a))
    for (path, a), b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                    err_msg=jax.tree_util.keystr(path))
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(_weights(dir_a)),
        jax.tree.leaves(_weights(dir_b))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                    err_msg=jax.tree_util.keystr(path))
    self.assertEqual(res_a['predictions'], res_b['predictions'])
    self.assertEqual(res_a['accuracy'], res_b['accuracy'])


_SHARDED_SCRIPT = r'''
import sys
import numpy as np
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import jax
import jax.numpy as jnp
from flax import nnx
import testing as tt
from gendd_jax import data as data_lib, optim, sharding, train
from gendd_jax import settings
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib

assert jax.device_count() == 8, jax.devices()
config = tt.small_config('gendd', epochs=2)
d = config.data
train_split, _, info = data_lib.create_splits(
    d.name, fold=0, num_folds=d.num_folds, label_fraction=0.5, seed=0)
teacher_mod = stages.create_backbone(config.teacher, info, 5)
t_graphdef, t_params, t_bs = nnx.split(teacher_mod, nnx.Param, nnx.BatchStat)
batches = data_lib.TrainBatches(train_split, 16, 0)
out = {{}}
for n in (1, 8):
  mesh = sharding.create_mesh(n)
  rep = sharding.replicated(mesh)
  module = stages.get('gendd').create_model(config, info)
  graphdef, params, bs = nnx.split(module, nnx.Param, nnx.BatchStat)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out[f'{{n}}/init{{jax.tree_util.keystr(path)}}'] = np.asarray(leaf)
  s = settings.step_settings(config, 'gendd', 7)
  train_step, _ = train.jitted_steps(s, mesh)
  teacher = teacher_lib.Teacher(
      variables=jax.device_put(dict(params=t_params, batch_stats=t_bs), rep),
      graphdef=t_graphdef)
  state = train.create_train_state(module, s.optim, mesh)
  # adaLN-zero: the diffusion loss reaches the condition, and so the
  # backbone, only from the third step on.
  for step in range(4):
    batch = sharding.shard_batch(batches.batch(step), mesh)
    shards = batch['image'].addressable_shards
    assert len(shards) == n and shards[0].data.shape[0] == 16 // n
    state, metrics = train_step(state, teacher, batch)
    for k, v in metrics.items():
      out[f'{{n}}/step{{step}}/{{k}}'] = np.asarray(v)
  assert len(state.params['head']['input_proj']['kernel'][...].sharding
             .device_set) == n
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    out[f'{{n}}/params{{jax.tree_util.keystr(path)}}'] = np.asarray(leaf)
np.savez({out_file!r}, **out)
print('ok')
'''


class SeedTest(absltest.TestCase):
  """The seed is a traced argument of the jitted steps: runs that differ
  only in seed share one executable, with the numbers of a constant seed."""

  def test_seeds_share_the_executable_and_match_a_constant_seed(self):
    config = testing.small_config('gendd', epochs=1)
    d = config.data
    train_split, test_split, info = data_lib.create_splits(
        d.name, fold=0, num_folds=d.num_folds, label_fraction=0.5, seed=0)
    teacher_mod = stages.create_backbone(config.teacher, info, 5)
    t_graphdef, t_params, t_bs = nnx.split(teacher_mod, nnx.Param,
                                           nnx.BatchStat)
    teacher = teacher_lib.Teacher(
        variables=dict(params=t_params, batch_stats=t_bs),
        graphdef=t_graphdef)
    batches = data_lib.TrainBatches(train_split, 16, 0)
    mesh = sharding.create_mesh(1)
    batch = sharding.shard_batch(batches.batch(0), mesh)
    images = next(iter(data_lib.eval_batches(test_split, 16)))['image']
    eval_in = {'image': sharding.shard_batch({'image': images},
                                             mesh)['image']}
    base = settings.step_settings(config, 'gendd', 7)
    # A new model each time (the same initial values): the jitted step
    # donates its state.
    fresh = lambda: train.create_train_state(  # noqa: E731
        stages.get('gendd').create_model(config, info), base.optim, mesh)

    out = {}
    for seed in (3, 4):
      s = dataclasses.replace(base, seed=seed)
      train_fn, eval_fn = train.jitted_steps(s, mesh)
      state, metrics = train_fn(fresh(), teacher, batch)
      preds, _ = eval_fn(state, teacher, eval_in, jnp.int32(0))
      # The same step with the seed a constant of the program.
      const = jax.jit(lambda st, te, b, s=s: train.train_step(s, st, te, b))
      c_state, c_metrics = const(fresh(), teacher, batch)
      c_preds, _ = jax.jit(lambda st, te, b, i, s=s: train.eval_step(
          s, st, te, b, i))(c_state, teacher, eval_in, jnp.int32(0))
      for a, b in zip(jax.tree.leaves(state.params),
                      jax.tree.leaves(c_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      self.assertEqual(float(metrics['loss']), float(c_metrics['loss']))
      for k in preds:
        np.testing.assert_array_equal(np.asarray(preds[k]),
                                      np.asarray(c_preds[k]))
      out[seed] = float(metrics['loss'])
    # Different seeds draw differently...
    self.assertNotEqual(out[3], out[4])
    # ... through one compiled train step.
    train_jit, _ = train._jitted(dataclasses.replace(base, seed=0), mesh)
    self.assertEqual(train_jit._cache_size(), 1)


class ShardingTest(absltest.TestCase):

  def test_eight_devices_match_one(self):
    out_file = os.path.join(testing.tmp_dir(), 'sharded.npz')
    script = _SHARDED_SCRIPT.format(root=_ROOT,
                                    tests=os.path.dirname(__file__),
                                    out_file=out_file)
    env = testing.subprocess_env(devices=8)
    proc = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with np.load(out_file) as f:
      got = {k: f[k] for k in f.files}
    one = {k[2:]: v for k, v in got.items() if k.startswith('1/')}
    eight = {k[2:]: v for k, v in got.items() if k.startswith('8/')}
    self.assertEqual(set(one), set(eight))
    self.assertIn('step3/loss', one)
    self.assertIn('step3/probe_ce', one)
    worst = {}
    for k in sorted(one):
      np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=1e-5,
                                 err_msg=k)
      worst[k] = float(np.max(np.abs(eight[k] - one[k])))
    print('max |8 devices - 1 device|:',
          {k: f'{worst[k]:.2e}' for k in worst if 'params' not in k},
          'params:', f'{max(v for k, v in worst.items() if "params" in k):.2e}')
    # Training moved every parameter (so the comparison is not vacuous).
    for k in one:
      if k.startswith('params'):
        self.assertFalse(np.array_equal(one[k], one['init' + k[6:]]), k)


class OptimTest(parameterized.TestCase):

  def test_learning_rate_warmup_then_cosine(self):
    spec = optim.OptimSpec(lr=1.0, weight_decay=0.0, total_steps=110,
                           warmup_steps=10, min_lr=0.1)
    lr = optim.learning_rate(spec)
    for step, want in ((0, 0.0), (5, 0.5), (10, 1.0), (60, 0.55),
                       (110, 0.1), (200, 0.1)):
      self.assertAlmostEqual(float(lr(step)), want, delta=1e-6, msg=step)
    quarter = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25))
    self.assertAlmostEqual(float(lr(35)), quarter, delta=1e-6)

  def test_learning_rate_step_and_constant(self):
    spec = optim.OptimSpec(lr=2.0, weight_decay=0.0, total_steps=100,
                           schedule='step', boundaries=(30, 60),
                           decay_rate=0.5)
    lr = optim.learning_rate(spec)
    for step, want in ((0, 2.0), (29, 2.0), (30, 1.0), (59, 1.0), (60, 0.5)):
      self.assertAlmostEqual(float(lr(step)), want, delta=1e-6, msg=step)
    const = optim.learning_rate(
        dataclasses.replace(spec, schedule='constant'))
    self.assertAlmostEqual(float(const(77)), 2.0, delta=1e-6)

  def test_beta2_ramp(self):
    spec = optim.OptimSpec(lr=1.0, weight_decay=0.0, total_steps=101,
                           beta2_min=0.95, beta2_max=0.999)
    b2 = optim.beta2(spec)
    values = np.asarray([float(b2(s)) for s in range(101)])
    self.assertAlmostEqual(values[0], 0.95, delta=1e-7)
    self.assertAlmostEqual(values[-1], 0.999, delta=1e-7)
    self.assertAlmostEqual(values[50], (0.95 + 0.999) / 2, delta=1e-6)
    self.assertTrue(np.all(np.diff(values) >= 0))

  def test_optimizer_uses_scheduled_beta2(self):
    spec = optim.OptimSpec(lr=1e-3, weight_decay=0.0, total_steps=11,
                           beta2_min=0.9, beta2_max=0.99)
    tx = optim.create_optimizer(spec)
    params = {'w': jnp.ones(3)}
    state = tx.init(params)
    self.assertAlmostEqual(float(state.hyperparams['b2']), 0.9, delta=1e-7)
    for _ in range(10):
      _, state = tx.update({'w': jnp.ones(3)}, state, params)
    # The hyperparameters are computed from the count before each update.
    self.assertAlmostEqual(float(state.hyperparams['b2']),
                           float(optim.beta2(spec)(9)), delta=1e-7)
    _, state = tx.update({'w': jnp.ones(3)}, state, params)
    self.assertAlmostEqual(float(state.hyperparams['b2']), 0.99, delta=1e-7)

  def test_decay_mask_on_gendd_params(self):
    config = testing.small_config('gendd')
    info = dict(num_classes=10, input_shape=(64,))
    module = nnx.eval_shape(
        lambda: stages.get('gendd').create_model(config, info))
    _, params, _ = nnx.split(module, nnx.Param, nnx.BatchStat)
    mask = optim.decay_mask(tuple(config.no_decay))(params)
    flat = {jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {p for p, v in flat.items() if v}
    self.assertTrue(any('head' in p for p in flat))
    self.assertTrue(any('cls_projector' in p for p in flat))
    for p in flat:
      top = p.split("'")[1]
      if top in ('head', 'cls_projector'):
        self.assertNotIn(p, decayed)
      else:
        self.assertEqual(top, 'backbone', p)
        self.assertIn(p, decayed)
    self.assertIn("['backbone']['layers'][0]['kernel'].value", decayed)

  def test_frozen_parameters_never_move(self):
    # The released unsupervised KL baseline keeps the student's classifier
    # at its initialisation: no update, weight decay included.
    for name in ('sgd', 'adamw'):
      spec = optim.OptimSpec(lr=0.5, weight_decay=0.1, total_steps=10,
                             schedule='constant', name=name, frozen=('fc',))
      tx = optim.create_optimizer(spec)
      params = {'backbone': {'kernel': jnp.full(3, 2.0)},
                'fc': {'kernel': jnp.full(3, 2.0)},
                'fc_norm': {'scale': jnp.full(3, 2.0)}}
      state = tx.init(params)
      for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params),
                                   state, params)
        params = optax.apply_updates(params, updates)
      np.testing.assert_array_equal(params['fc']['kernel'], 2.0)
      self.assertTrue(np.all(params['backbone']['kernel'] < 1.0), name)
      self.assertTrue(np.all(params['fc_norm']['scale'] < 1.0), name)

  def test_weight_decay_applies_to_masked_params_only(self):
    spec = optim.OptimSpec(lr=0.5, weight_decay=0.1, total_steps=10,
                           schedule='constant', no_decay=('head',))
    tx = optim.create_optimizer(spec)
    params = {'backbone': {'kernel': jnp.full(3, 2.0)},
              'head': {'kernel': jnp.full(3, 2.0)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates['backbone']['kernel'], -0.5 * 0.1 * 2.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(updates['head']['kernel'], 0.0)


if __name__ == '__main__':
  absltest.main()
