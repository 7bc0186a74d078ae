"""Training and evaluation of one stage: the state, the jitted steps, the loop.

`train_step` and `eval_step` are module-level functions of the static step
settings (`settings.StepSettings`), the state, the frozen teacher and a
batch; what differs between stages is asked of the stage's record
(`stages.Stage.loss` / `.predict`). `jitted_steps` compiles them once per
settings but the seed, which is an argument (a k-fold protocol over several
seeds compiles each stage once), with explicit shardings and a donated
state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from typing import Any, Callable

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import data as data_lib
from gendd_jax import flops
from gendd_jax import optim
from gendd_jax import reliability
from gendd_jax import reporting
from gendd_jax import settings as settings_lib
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
from gendd_jax import walltime
from gendd_jax.data import features as features_lib
from gendd_jax.errors import ConfigChangedError
from gendd_jax.errors import ConfigError
from gendd_jax.errors import Preempted
from gendd_jax.settings import StepSettings


@flax.struct.dataclass
class TrainState:
  """Parameters, BatchNorm statistics, optimizer state and step.

  Fields are in the order of the checkpointed dict (`arrays`).
  """
  batch_stats: Any
  opt_state: Any
  params: Any
  step: jax.Array
  graphdef: Any = flax.struct.field(pytree_node=False)

  def arrays(self) -> dict[str, Any]:
    """The checkpointed part: every field but the static graphdef."""
    return dict(batch_stats=self.batch_stats, opt_state=self.opt_state,
                params=self.params, step=self.step)


def create_train_state(module: nnx.Module, ospec: optim.OptimSpec, mesh
                       ) -> TrainState:
  """The replicated step-0 state of `module`."""
  graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  tx = optim.create_optimizer(ospec)
  arrays = jax.device_put(dict(
      step=jnp.int32(0), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params)), sharding.replicated(mesh))
  return TrainState(graphdef=graphdef, **arrays)


def abstract_train_state(params, batch_stats, ospec: optim.OptimSpec,
                         graphdef=None) -> TrainState:
  """The shapes of a state (nothing allocated), e.g. to restore into."""
  return TrainState(
      graphdef=graphdef, step=jax.ShapeDtypeStruct((), jnp.int32),
      params=params, batch_stats=batch_stats,
      opt_state=jax.eval_shape(optim.create_optimizer(ospec).init, params))


def _loss_fn(s: StepSettings, graphdef, params, batch_stats, teacher, batch,
             key):
  """`(loss, (metrics, new_batch_stats))` of one (micro-)batch."""
  # Fresh Variables at this trace level: BatchNorm updates its statistics in
  # place, which NNX allows only on Variables created in the current trace.
  batch_stats = jax.tree.map(lambda x: x, batch_stats)
  model = nnx.merge(graphdef, params, batch_stats)
  loss, metrics = stages.get(s.stage).loss(s, model, teacher, batch, key)
  metrics['loss'] = loss
  return loss, (metrics, nnx.state(model, nnx.BatchStat))


def _grads(s: StepSettings, state: TrainState, teacher, batch, key):
  """Mean gradient and metrics over `s.accum_steps` micro-batches.

  Micro-batch `i` takes rows `i, i + A, i + 2A, ...` of the batch, so on a
  data-sharded batch every device contributes its own rows to each
  micro-batch (no data movement). BatchNorm statistics are threaded through
  the micro-batches in order.

  A batch may carry `draws`: random draws recorded elsewhere (e.g. by the
  reference code) that replace the step's own (`gendd.mix_features`,
  `gendd.diffusion_loss`), so that a step replays exactly. They describe
  the whole batch and cannot be split into micro-batches.
  """
  grad_fn = jax.grad(functools.partial(_loss_fn, s, state.graphdef),
                     has_aux=True)
  a = s.accum_steps
  if a > 1 and 'draws' in batch:
    raise ValueError('recorded draws cannot be replayed with gradient '
                     'accumulation (grad_accum_steps > 1)')
  if a == 1:
    return grad_fn(state.params, state.batch_stats, teacher, batch, key)
  micro = jax.tree.map(
      lambda x: jnp.swapaxes(
          x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), batch)

  def body(carry, inp):
    acc, bs = carry
    mb, i = inp
    g, (m, bs) = grad_fn(state.params, bs, teacher, mb,
                         jax.random.fold_in(key, i))
    return (jax.tree.map(jnp.add, acc, g), bs), m

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (acc, new_bs), ms = jax.lax.scan(body, (zeros, state.batch_stats),
                                   (micro, jnp.arange(a)))
  grads = jax.tree.map(lambda g: g / a, acc)
  return grads, (jax.tree.map(lambda m: jnp.mean(m, 0), ms), new_bs)


def train_step(s: StepSettings, state: TrainState, teacher, batch,
               seed: jax.Array | int | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update; a non-finite loss or gradient leaves the state
  as it was (flagged in `metrics['nonfinite']`). `seed` (traced, or None
  for `s.seed`) keys the step's random draws."""
  seed = s.seed if seed is None else seed
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  grads, (metrics, new_bs) = _grads(s, state, teacher, batch, key)
  tx = optim.create_optimizer(s.optim)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['lr'] = optim.learning_rate(s.optim)(state.step)
  # The host stops or skips on a flagged step (`on_nonfinite`).
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  keep = functools.partial(jax.tree.map,
                           lambda new, old: jnp.where(finite, new, old))
  metrics['nonfinite'] = jnp.logical_not(finite).astype(jnp.int32)
  return state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(new_bs, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state)), metrics


def eval_step(s: StepSettings, state: TrainState, teacher, batch, index,
              seed: jax.Array | int | None = None
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """`(predicted classes, diagnostics)` per prediction of the stage."""
  seed = s.seed if seed is None else seed
  model = nnx.merge(state.graphdef, state.params, state.batch_stats)
  logits, diag = stages.get(s.stage).predict(
      s, model, teacher, batch['image'], stages.eval_key(seed, index))
  preds = {k: jnp.argmax(v, -1).astype(jnp.int32) for k, v in logits.items()}
  return preds, diag


class _Seeded:
  """A jitted step with the seed bound as its last, traced argument: called
  (or `.trace`d, `.lower`ed) like the step of one seed."""

  def __init__(self, jitted, seed: int):
    self._jitted, self._seed = jitted, jnp.int32(seed)

  def __call__(self, *args):
    return self._jitted(*args, self._seed)

  def trace(self, *args):
    return self._jitted.trace(*args, self._seed)

  def lower(self, *args):
    return self._jitted.lower(*args, self._seed)


@functools.lru_cache(maxsize=None)
def _jitted(s: StepSettings, mesh) -> tuple[Callable, Callable]:
  """The jitted steps of `s` (whose seed is ignored) taking the seed last."""
  rep = sharding.replicated(mesh)
  dat = sharding.data_sharded(mesh)
  train_jit = jax.jit(functools.partial(train_step, s),
                      in_shardings=(rep, rep, dat, None),
                      out_shardings=(rep, rep), donate_argnums=(0,))
  eval_jit = jax.jit(functools.partial(eval_step, s),
                     in_shardings=(rep, rep, dat, None, None),
                     out_shardings=dat)
  return train_jit, eval_jit


def jitted_steps(s: StepSettings, mesh) -> tuple[Callable, Callable]:
  """The jitted `(train_step, eval_step)` of `s` on `mesh`: called as
  `train(state, teacher, batch)` and `eval(state, teacher, batch, index)`.
  Compiled once per settings other than the seed, which is passed traced
  (runs that differ only in seed share the executables; same numbers as a
  constant seed)."""
  train_jit, eval_jit = _jitted(dataclasses.replace(s, seed=0), mesh)
  return _Seeded(train_jit, s.seed), _Seeded(eval_jit, s.seed)


def evaluate(eval_fn, state, teacher, batches, mesh) -> dict[str, Any]:
  """Runs `eval_fn` over `batches` (every example once, with `valid`
  masks); returns accuracies, predictions, labels and example ids.

  Labels, ids and masks are sharded with their images, so on several
  processes every row of the gathered predictions meets its own label.
  """
  preds: dict[str, list[np.ndarray]] = {}
  diags: dict[str, list[np.ndarray]] = {}
  labels, index = [], []
  for i, b in enumerate(batches):
    sb = sharding.shard_batch(dict(
        image=b['image'], label=np.asarray(b['label'], np.int32),
        id=np.asarray(b['id'], np.int32), valid=b['valid']), mesh)
    out = eval_fn(state, teacher, {'image': sb['image']}, jnp.int32(i))
    rows = {k: sb[k] for k in ('label', 'id', 'valid')}
    if jax.process_count() > 1:  # Every process sees every prediction.
      out, rows = multihost_utils.process_allgather((out, rows), tiled=True)
    valid = np.asarray(rows['valid']) > 0
    labels.append(np.asarray(rows['label'])[valid])
    index.append(np.asarray(rows['id'])[valid])
    for dest, values in zip((preds, diags), out):
      for k, v in values.items():
        dest.setdefault(k, []).append(np.asarray(v)[valid])
  labels, index = np.concatenate(labels), np.concatenate(index)
  preds = {k: np.concatenate(v) for k, v in preds.items()}
  accs = {k: float(np.mean(v == labels) * 100.0)
          for k, v in preds.items()}
  diag = {k: float(np.median(np.concatenate(v))) for k, v in diags.items()}
  return dict(accuracy=accs, predictions=preds, diagnostics=diag,
              labels=labels, index=index)


@dataclasses.dataclass
class _Run:
  """Everything one stage's loop works with, built by `_setup`."""
  config: Any
  workdir: str
  stage: stages.Stage
  mesh: Any
  dataset: Any
  stream: Any
  teacher: teacher_lib.Teacher
  state: TrainState
  s: StepSettings
  meta: dict[str, Any]
  log: Callable[[str], None]


def _setup(config, workdir: str, quiet: bool) -> _Run:
  """Validates the config, opens the data, builds the model and teacher."""
  stage = stages.get(config.stage)
  reliability.check_workdir(workdir)
  mesh = settings_lib.create_mesh(config)
  d = settings_lib.stage_data(config, stage.name)
  dataset = data_lib.open_dataset(d, config.seed, jax.process_index(),
                                  jax.process_count())
  info, stream = dataset.info, dataset.train
  precomputed = settings_lib.precomputed_teacher(config, stage.name)
  if precomputed:
    stream, pmeta = features_lib.train_stream(config, jax.process_index(),
                                              jax.process_count())
    if stage.reads_logits and not pmeta['logits']:
      raise ConfigError(f'stage {stage.name!r} needs teacher logits; the '
                        f'features at {config.teacher.features} were written '
                        'without (set precompute.logits=True)')
  if stage.labels != 'none' and not info['labelled']:
    raise ConfigError(f'stage {stage.name!r} needs labels; dataset '
                      f'{d.name!r} has none (use kl or gendd_unsup)')
  module = stage.create_model(config, info)  # Checks settings before I/O.
  teacher = teacher_lib.Teacher()
  if stage.needs_teacher:
    teacher = teacher_lib.load(config, info, mesh, precomputed)
  if stage.name != 'teacher' and config.student.init_from:
    teacher_lib.init_backbone(config, info, module, mesh)
  epoch = settings_lib.epoch_steps(config, stream.steps_per_epoch)
  s = settings_lib.step_settings(config, stage.name, epoch, precomputed)
  if not quiet and jax.process_index() == 0:
    print(reporting.startup_summary(config, stage.name, mesh, module,
                                    teacher.variables, info, epoch, s.optim),
          flush=True)
  if stage.generative:
    teacher = teacher_lib.with_target_stats(
        config, teacher, dataset.train_eval_batches(
            d.get('stats_batches') or None), mesh)
  # What a standalone export/evaluation of a checkpoint needs besides the
  # weights: the config and the target space of the diffusion head.
  meta = dict(stage=stage.name, config=json.loads(config.to_json()),
              num_classes=info['num_classes'],
              input_shape=list(info['input_shape']))
  if teacher.clip_bound is not None:
    meta['clip_bound'] = float(teacher.clip_bound)
  if teacher.target_stats is not None:
    meta['target_stats'] = {
        k: np.asarray(v).tolist() for k, v in teacher.target_stats.items()}
  log = (lambda msg: None) if quiet else functools.partial(print, flush=True)
  return _Run(config, workdir, stage, mesh, dataset, stream, teacher,
              create_train_state(module, s.optim, mesh), s, meta, log)


def _resume(run: _Run, ckpt) -> None:
  """Restores the latest readable checkpoint and the example stream, after
  checking that it was saved by a run of the same settings."""
  rep = sharding.replicated(run.mesh)
  # Falls back past unreadable checkpoints (moved aside, not deleted).
  restored = ckpt.restore_latest_valid(
      ckpt_lib.abstract_like(run.state.arrays(), rep),
      check=functools.partial(_check_resume, run), log=run.log)
  if restored is None:
    return
  arrays, meta = restored
  run.state = run.state.replace(**arrays)
  start = int(run.state.step)
  if 'data_state' in meta:
    run.stream.set_state(meta['data_state'])
  elif isinstance(run.stream, data_lib.ArrayStream):
    run.stream.step = start  # A checkpoint from before data states were kept.
  else:
    raise ckpt_lib.CheckpointError(
        f'checkpoint {ckpt.latest_step()} in {run.workdir} has no '
        'data-iterator state to resume the example stream from')
  run.log(f'[{run.stage.name}] resumed from step {start} ({run.workdir})')


def _check_resume(run: _Run, step: int, saved: dict[str, Any]) -> None:
  """Refuses to resume from checkpoint `step` (meta `saved`) when it was
  saved under a config that differs in what the state depends on (unless
  `allow_config_changes`)."""
  changes = reliability.config_changes(saved.get('config', {}),
                                       run.meta['config'])
  if not changes:
    return
  listed = '; '.join(changes)
  if not run.config.get('allow_config_changes', False):
    raise ConfigChangedError(
        f'{run.workdir}: the config differs from the one checkpoint {step} '
        f'was saved with ({listed}). Resume with the same settings, start '
        'over in a new --workdir, or pass '
        '--config.allow_config_changes=True to resume anyway')
  run.log(f'warning: resuming checkpoint {step} under a changed config '
          f'(allow_config_changes): {listed}')


def _flops_estimate(run: _Run, jaxpr, steps: int) -> str:
  """The traced step's FLOPs and the estimated time of `steps` of them on
  these devices (or, where their peak is unknown, on `REFERENCE`)."""
  step_flops = flops.matmul_flops(jaxpr)
  kind, chips = jax.devices()[0].device_kind, jax.device_count()
  secs = walltime.seconds(step_flops * steps, kind, chips)
  if secs is None:
    kind, chips = walltime.REFERENCE
    secs = walltime.seconds(step_flops * steps, kind, chips)
  return (f'[{run.stage.name}] {step_flops / 1e9:.3g} GFLOP per step; '
          f'{steps} steps: ' + walltime.describe(secs, kind, chips))


def _loop(run: _Run, ckpt, writer, train_fn, periodic_fn
          ) -> dict[str, Any]:
  """Trains from the state's step to the end; returns the loop's record.

  Logged train metrics are means over the steps since the last log line
  (`lr` is the current one); `periodic_fn` evaluates every
  `eval_every_steps` on the first `eval_subset_batches` evaluation batches.
  """
  config, name, mesh = run.config, run.stage.name, run.mesh
  start, total = int(run.state.step), run.s.optim.total_steps
  guard = reliability.NonFiniteGuard(settings_lib.on_nonfinite(config),
                                     run.workdir, ckpt)
  save = lambda step: ckpt.save(step, run.state.arrays(), run.meta,  # noqa
                                data_state=run.stream.get_state())
  history = []  # Periodic evaluations of this invocation.
  log_every = max(1, config.log_every_steps)
  means = reporting.IntervalMeans()
  hooks = reporting.progress_hooks(
      config, reporting.logdir(config, run.workdir), writer, start)
  estimate = reporting.WallTimeEstimate(name, start, total, run.log)
  t0 = last_t = time.time()
  last_step = start
  with reliability.PreemptionWatch() as watch, reporting.closing(hooks):
    for step in range(start, total):
      batch = sharding.shard_batch(run.stage.visible(next(run.stream)), mesh)
      if step == start:
        # Traced before the call, which reuses the trace (after it the
        # state is donated).
        jaxpr = train_fn.trace(run.state, run.teacher, batch).jaxpr
      run.state, metrics = train_fn(run.state, run.teacher, batch)
      if step == start:
        run.log(_flops_estimate(run, jaxpr, total - start))
      done = step + 1
      guard.add(done, metrics['nonfinite'])
      means.add(metrics)
      for hook in hooks:
        hook(done)
      if done % log_every == 0 or done == total:
        guard.check()
        scalars = means.pop()  # The only host sync in the loop.
        now = time.time()
        rate = (done - last_step) / max(now - last_t, 1e-9)
        last_t, last_step = now, done
        writer.write_scalars(done, scalars)
        run.log(f'[{name}] step {done}/{total} loss {scalars["loss"]:.4f} '
                f'lr {scalars["lr"]:.2e} {rate:.1f} steps/s ETA '
                f'{reporting.hms((total - done) / max(rate, 1e-9))}')
        estimate.update(done, now)
      every = config.checkpoint_every_steps
      if every and done % every == 0 and done < total:
        guard.check()  # Never checkpoint past an unnoticed bad step.
        save(done)
      if done < total and watch.should_stop(done):
        guard.check()
        if ckpt.latest_step() != done:
          save(done)
        ckpt.wait()
        when = ('' if watch.received_at is None else
                f' {time.time() - watch.received_at:.1f}s after the signal')
        raise Preempted(
            f'[{name}] SIGTERM: saved checkpoint {done} of {run.workdir}'
            f'{when} (every process stopped at step {done}); run the same '
            'command to resume')
      if (config.eval_every_steps and done % config.eval_every_steps == 0 and
          done < total):
        subset = config.get('eval_subset_batches', 0) or None
        res = evaluate(periodic_fn, run.state, run.teacher, itertools.islice(
            run.dataset.eval_batches(), subset), mesh)
        history.append(dict(step=done, accuracy=res['accuracy'],
                            examples=len(res['labels'])))
        writer.write_scalars(done, {f'eval/{k}': v
                                    for k, v in res['accuracy'].items()})
        run.log(f'[{name}] eval at step {done} ({len(res["labels"])} '
                f'examples): {reporting.accuracies(res["accuracy"])}')
  train_time = time.time() - t0
  guard.check()
  if start < total:
    save(total)
  return dict(train_seconds=train_time, periodic_eval=history,
              skipped_nonfinite_steps=guard.skipped)


def export_meta(config, meta: dict[str, Any], step: int | None,
                source: str | None = None) -> dict[str, Any]:
  """The metadata of an export of `config`'s stage at `step`."""
  stage = stages.get(meta['stage'])
  return dict(meta, model=config[stage.role].model,
              teacher_model=config.teacher.model, step=step, source=source,
              created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))


def _shot_results(run: _Run, res: dict[str, Any]) -> dict[str, Any]:
  """With `data.shot_groups`: the many/medium/few-shot top-1 of every
  prediction (`shot_accuracy`), also logged."""
  d = run.config.data
  if not d.get('shot_groups', False):
    return {}
  n = int(run.dataset.info['num_classes'])
  counts = data_lib.train_class_counts(d, run.config.seed, n)
  out = {}
  for k, pred in res['predictions'].items():
    hits, totals = data_lib.per_class(pred == res['labels'], res['labels'], n)
    out[k] = data_lib.shot_accuracy(hits, totals, counts)
    run.log(f'{k} by shot group: ' + ', '.join(
        f'{g} {v:.2f}%' for g, v in out[k].items()))
  return dict(shot_accuracy=out)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       quiet: bool = False) -> dict[str, Any]:
  """Trains `config.stage`, evaluates it, exports it; returns the results.

  Resumes from the latest checkpoint in `workdir/checkpoints` if present.
  Writes `results.json` and `export/` (weights for later stages/evaluation).
  """
  run = _setup(config, workdir, quiet)
  train_fn, eval_fn = jitted_steps(run.s, run.mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                               max_to_keep=config.keep_checkpoints)
  writer = None
  try:
    _resume(run, ckpt)
    writer = reporting.create_writer(reporting.logdir(config, workdir))
    total = run.s.optim.total_steps
    if int(run.state.step) == 0 and jax.process_index() == 0:
      writer.write_hparams({'stage': run.stage.name, 'total_steps': total,
                            'batch_size': config.data.batch_size})
    periodic_fn = (jitted_steps(settings_lib.periodic_eval_settings(run.s),
                                run.mesh)[1]
                   if config.eval_every_steps else None)
    record = _loop(run, ckpt, writer, train_fn, periodic_fn)
    t1 = time.time()
    res = evaluate(eval_fn, run.state, run.teacher,
                   run.dataset.eval_batches(), run.mesh)
    eval_time = time.time() - t1
    writer.write_scalars(total, {f'eval/{k}': v
                                 for k, v in res['accuracy'].items()})
  finally:
    ckpt.close()  # Waits for async saves, also on errors.
    if writer is not None:
      writer.close()  # The summaries so far, also on errors.

  # Every process takes part in the orbax save; process 0 writes the JSON.
  ckpt_lib.save_export(
      os.path.join(workdir, 'export'),
      dict(params=run.state.params, batch_stats=run.state.batch_stats),
      export_meta(config, run.meta, total),
      classifier=(run.teacher.classifier()
                  if run.stage.classifies_with_teacher else None),
      target_stats=run.teacher.target_stats)
  results = dict(
      stage=run.stage.name, steps=total,
      train_seconds=record['train_seconds'],
      skipped_nonfinite_steps=record['skipped_nonfinite_steps'],
      eval_seconds=eval_time, accuracy=res['accuracy'],
      **_shot_results(run, res),
      diagnostics=res['diagnostics'], periodic_eval=record['periodic_eval'],
      predictions={k: v.tolist() for k, v in res['predictions'].items()},
      labels=res['labels'].tolist(), index=res['index'].tolist())
  ckpt_lib.publish({os.path.join(workdir, 'results.json'):
                    json.dumps(results)}, 'results')
  return results
