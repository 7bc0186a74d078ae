r"""Standalone evaluation of an export (no training code).

  python -m gendd_jax.cli.evaluate --checkpoint=exports/r50 \
      [--config=configs/r50_600ep.py] [--mode=both] [--steps=64] \
      [--sampler=ancestral] [--cfg_scale=2] [--temperature=1] \
      [--num_sampling=5] [--data_dir=...] [--out=eval.json]

Loads an export (a run's final `<workdir>/export`, or one written by
`python -m gendd_jax.cli.export` from any checkpoint) and evaluates it
on the eval split of the config's dataset (the config stored in the export
unless `--config` is given; its model settings must match the export), or
on any labelled dataset with `--data=<kind>:<name>` (and `--split`): only
the evaluated split is opened, so a dataset holding just that split works.
Modes: `sample` generates the teacher-space feature with the diffusion head
(`--sampler`, `--steps`, `--cfg_scale`, `--temperature`, `--num_sampling`
draws averaged) and classifies it with the teacher classifier; `probe` uses
the linear probe (no sampling); `both`; `logits` for the classifier networks
of the other stages. Prints top-1/top-5 and images/s (timed after
compilation) per mode. Sampler settings left unset come from the config.

Runs data-parallel over every device, and with `--distributed` over every
process (each reads its slice of every batch); batches stream, so host
memory holds a batch or two whatever the split's size.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import time
from typing import Any, Iterable, NamedTuple

from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import data as data_lib
from gendd_jax import diffusion
from gendd_jax import errors
from gendd_jax import gendd
from gendd_jax import paths
from gendd_jax import precision
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax.cli import common

_MODE = flags.DEFINE_enum('mode', None, ['sample', 'probe', 'both', 'logits'],
                          'What to evaluate (default: both for GenDD, '
                          'logits otherwise).')
_SAMPLER = flags.DEFINE_string('sampler', None, 'ancestral, ddim, dpmpp_2m '
                               'or posterior_mean (default: the config\'s).')
_STEPS = flags.DEFINE_string('steps', None, "Sampling steps (respacing: 'N' "
                             "as the paper, 'trailingN' from t = T - 1).")
_CFG = flags.DEFINE_float('cfg_scale', None, 'Classifier-free guidance.')
_TEMP = flags.DEFINE_float('temperature', None, 'Per-step noise scale.')
_INIT_TEMP = flags.DEFINE_float(
    'init_temperature', None, 'Scale of the initial noise x_T (0 with '
    '--temperature=0: deterministic sampling).')
_NUM = flags.DEFINE_integer('num_sampling', None, 'Draws averaged per image.')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', 0, 'Stop after this many '
                                    'batches (0: the whole split).')
# Deprecated: evaluate's name for --out before the commands shared it.
flags.DEFINE_alias('output', 'out')
_DATA = flags.DEFINE_string(
    'data', None, 'Evaluate on this labelled dataset instead of the '
    "config's ('<kind>:<name>' as made by build_dataset, e.g. "
    "folder:mydata, or 'tfds:<name>'); only its evaluation split is read.")
_SPLIT = flags.DEFINE_string(
    'split', None, "The split to evaluate (default: the config's "
    'data.eval_split).')
for _name in ('checkpoint', 'config', 'clip_x0', 'batch_size', 'data_dir',
              'seed', 'out', 'distributed', 'coordinator_address',
              'num_processes', 'process_id', 'heartbeat_timeout'):
  flags.declare_key_flag(_name)

class Exported(NamedTuple):
  """A loaded export: the model and what classifies its features."""
  stage: str
  config: Any
  graphdef: Any
  variables: dict[str, Any]
  classifier: dict[str, Any] | None
  target_stats: dict[str, Any] | None
  meta: dict[str, Any]


class SamplerSpec(NamedTuple):
  sampler: str
  steps: str
  cfg_scale: float
  temperature: float
  num_sampling: int
  # Bound on the x0 estimate, a `diffusion.Threshold` or None (off).
  clip_x0: float | diffusion.Threshold | None = None
  # Scale of the initial noise (`gendd.SampleSettings.init_temperature`).
  init_temperature: float = 1.0


def load(directory: str, config=None) -> Exported:
  """Rebuilds the exported model (`config` defaults to the stored one)."""

  meta = ckpt_lib.load_export_meta(directory)
  if 'config' not in meta or 'stage' not in meta:
    raise ckpt_lib.CheckpointError(
        f'{directory} holds no training config to rebuild its model from '
        '(a converted teacher? evaluate a run, or export one with python -m '
        'gendd_jax.cli.export --workdir=<run> --out=<dir>)')
  config, stage, _, graphdef, params, bs = stages.abstract_model(meta, config)
  # Replicated over every device of every process (the evaluation mesh).
  tree, _ = ckpt_lib.load_export(directory, ckpt_lib.abstract_like(
      dict(params=params, batch_stats=bs),
      sharding.replicated(sharding.create_mesh())))
  if stages.get(stage).classifies_with_teacher and 'classifier' not in tree:
    raise ckpt_lib.CheckpointError(
        f'{directory} lacks the teacher classifier a {stage} model is '
        'evaluated with')
  return Exported(stage, config, graphdef, tree['model'],
                  tree.get('classifier'), tree.get('target_stats'), meta)


def sampler_spec(config, sampler=None, steps=None, cfg_scale=None,
                 temperature=None, num_sampling=None, clip_x0=None,
                 clip_bound=None, init_temperature=None) -> SamplerSpec:
  """The sampler settings: arguments given, else the config's evaluation
  defaults (`sampler.eval_kind`, `sampler.eval_steps`, `eval_cfg_scale`,
  `eval_temperature`, `eval_init_temperature`, `eval_clip_x0`,
  `eval_num_sampling`: the paper configs
  average 5 draws; the digits configs take the few-step study's choice),
  else the training loop's (`sampler.kind`, `steps`, ...).

  `clip_x0` is 'none', 'data' (the training targets' range, `clip_bound`,
  stored in the export), a number, or 'dynamic[:P]' / 'dynamic_clip[:P]'
  (thresholding relative to `clip_bound`; see `gendd.parse_clip_x0`).
  """
  s = config.sampler
  pick = lambda v, d: d if v is None else v  # noqa: E731
  bound = gendd.parse_clip_x0(pick(clip_x0, s.get('eval_clip_x0',
                                                  s.get('clip_x0', 'none'))))
  if bound == 'data':
    if clip_bound is None:
      raise ValueError("clip_x0='data' needs the export's clip_bound (this "
                       'export has none)')
    bound = float(clip_bound)
  elif clip_bound is not None:
    bound = gendd.with_bound(bound, float(clip_bound))
  return SamplerSpec(pick(sampler, s.get('eval_kind',
                                         s.get('kind', 'ancestral'))),
                     str(pick(steps, s.get('eval_steps', s.steps))),
                     float(pick(cfg_scale, s.get('eval_cfg_scale',
                                                 s.cfg_scale))),
                     float(pick(temperature, s.get('eval_temperature',
                                                   s.temperature))),
                     int(pick(num_sampling, s.get('eval_num_sampling',
                                                  s.num_sampling))), bound,
                     float(pick(init_temperature, s.get(
                         'eval_init_temperature',
                         s.get('init_temperature', 1.0)))))


def describe_clip(clip) -> str:
  """`clip_x0` in words, for the printed results ('' when off)."""
  if clip is None:
    return ''
  if isinstance(clip, diffusion.Threshold):
    how = 'rescaled' if clip.rescale else 'clipped'
    return (f', x0 {how} at its {clip.percentile:g}th percentile beyond '
            f'±{float(clip.bound):.3g}')
  return f', x0 clipped to ±{clip:.3g}'


def _sampling(g, spec: SamplerSpec):
  """`(schedule, gendd.SampleSettings)` of `spec` for the head settings `g`
  (`config.gendd` or a dict of it)."""
  sched = gendd.sampling_schedule(g['noise_schedule'], g['diffusion_steps'],
                                  spec.steps, spec.sampler)
  settings = gendd.SampleSettings(int(g['token_dim']), spec.num_sampling,
                                  spec.cfg_scale, spec.temperature,
                                  spec.clip_x0, sampler=spec.sampler,
                                  init_temperature=spec.init_temperature)
  return sched, settings


# Stands for the x0 bound in a compiled function's spec: the bound itself is
# an argument, so runs (folds) with different bounds share one compile.
_TRACED = 'traced'


def _split_bound(spec: SamplerSpec | None
                 ) -> tuple[SamplerSpec | None, np.ndarray]:
  """`(spec with its x0 bound replaced by _TRACED, the bound)`."""
  clip = None if spec is None else spec.clip_x0
  if clip is None:
    return spec, np.float32(0.0)
  if isinstance(clip, diffusion.Threshold):
    return (spec._replace(clip_x0=clip._replace(bound=_TRACED)),
            np.float32(clip.bound))
  return spec._replace(clip_x0=_TRACED), np.float32(clip)


def _with_bound(clip, bound):
  """The inverse of `_split_bound` inside the compiled function."""
  if isinstance(clip, str) and clip == _TRACED:
    return bound
  return gendd.with_bound(clip, bound)


@functools.lru_cache(maxsize=None)
def _counts_fn(ex_key, mode: str, spec: SamplerSpec | None, mesh):
  """A jitted `(variables, classifier, stats, batch, key, bound) -> (top-1
  hits per class, top-5 hits, examples per class)` over a batch sharded
  along the mesh's data axis (variables replicated); only these counts
  leave the devices. `spec` comes from `_split_bound`, `bound` is its x0
  bound."""
  stage, graphdef, g = ex_key
  record = stages.get(stage)
  if mode == 'sample':
    sched, settings = _sampling(g, spec)

  def logits_of(variables, classifier, stats, image, key, bound):
    model = nnx.merge(graphdef, variables['params'],
                      variables['batch_stats'])
    if mode == 'logits':
      if record.classifies_with_teacher:
        return model(image, classifier['weight'], classifier['bias'])
      return model(image)[1]
    z, probe, _ = precision.to_float32(model.student(image))
    if mode == 'probe':
      return probe
    sample = settings._replace(clip_x0=_with_bound(settings.clip_x0, bound))
    return gendd.sampled_logits(model.head, sched, key, z, sample,
                                classifier['weight'], classifier['bias'],
                                stats)[0]

  def fn(variables, classifier, stats, batch, key, bound):
    logits = logits_of(variables, classifier, stats, batch['image'], key,
                       bound)
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit = top == batch['label'][:, None]
    valid = batch['valid'] > 0
    per_class = jnp.zeros(logits.shape[-1], jnp.int32)
    return (per_class.at[batch['label']].add(hit[:, 0] & valid),
            jnp.sum(hit.any(-1) & valid),
            per_class.at[batch['label']].add(valid))

  rep = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, rep, rep,
                                   sharding.data_sharded(mesh), rep, rep),
                 out_shardings=rep)


def _key(ex: Exported):
  g = ex.config.gendd
  return (ex.stage, ex.graphdef,
          _Frozen(token_dim=int(g.token_dim),
                  noise_schedule=str(g.noise_schedule),
                  diffusion_steps=int(g.diffusion_steps)))


class _Frozen(dict):
  def __hash__(self):
    return hash(tuple(sorted(self.items())))


def modes_of(ex: Exported, mode: str | None) -> tuple[str, ...]:
  record = stages.get(ex.stage)
  gen = record.generative
  mode = mode or ('both' if gen else 'logits')
  if mode == 'logits' and gen:
    raise ValueError("mode 'logits' is for classifier exports; a GenDD "
                     "export takes 'sample', 'probe' or 'both'")
  if mode != 'logits' and not gen:
    raise ValueError(f'a {ex.stage} export has no diffusion head or probe; '
                     "use --mode=logits")
  if mode == 'probe' and not record.has_probe:
    raise ValueError('an unsupervised GenDD export has no trained probe')
  return {'both': ('sample', 'probe'), 'sample': ('sample',),
          'probe': ('probe',), 'logits': ('logits',)}[mode]


def evaluate(ex: Exported, batches: Iterable[dict[str, Any]], mode: str,
             spec: SamplerSpec | None = None, seed: int | None = None,
             max_batches: int = 0, mesh=None,
             train_counts: np.ndarray | None = None) -> dict[str, Any]:
  """Top-1/top-5 (%) and images/s of one mode over `batches` (each this
  process's slice of a global batch, with `image`, `label`, `valid`), and
  with `train_counts` (training images per class) the many/medium/few-shot
  top-1 (`data.shot_accuracy`).

  Runs data-parallel on `mesh` (default: every device of every process),
  streaming: host memory holds a batch or two, never the split. `seed`
  defaults to the config's; batch `i` draws the training loop's evaluation
  noise, so the numbers do not depend on the device count.
  """
  seed = int(ex.config.seed) if seed is None else seed
  mesh = mesh or sharding.create_mesh()
  spec, bound = _split_bound(spec if mode == 'sample' else None)
  fn = _counts_fn(_key(ex), mode, spec, mesh)
  rep = sharding.replicated(mesh)
  args = jax.device_put((ex.variables, ex.classifier, ex.target_stats), rep)
  bound = jax.device_put(bound, rep)
  stream = iter(batches)
  if max_batches:
    stream = itertools.islice(stream, max_batches)
  first = next(stream, None)
  if first is None:
    raise ValueError('the evaluation split is empty')

  def shard(b):
    return sharding.shard_batch(dict(
        image=b['image'], label=np.asarray(b['label'], np.int32),
        valid=np.asarray(b['valid'], np.float32)), mesh)
  # Compile (and warm up) outside the timed pass.
  jax.block_until_ready(fn(*args, shard(first), stages.eval_key(seed, 0),
                           bound))
  totals = None
  t0 = time.perf_counter()
  pending = None

  def add(totals, out):
    out = [np.asarray(v, np.int64) for v in jax.device_get(out)]
    return out if totals is None else [a + b for a, b in zip(totals, out)]
  for i, b in enumerate(itertools.chain([first], stream)):
    # Dispatch batch i before reading the counts of batch i - 1.
    out = fn(*args, shard(b), stages.eval_key(seed, i), bound)
    if pending is not None:
      totals = add(totals, pending)
    pending = out
  hits, top5, per_class = add(totals, pending)
  seconds = time.perf_counter() - t0
  n = int(per_class.sum())
  if not n:
    raise ValueError('the evaluation split is empty')
  out = dict(top1=100.0 * int(hits.sum()) / n, top5=100.0 * int(top5) / n,
             images=n, seconds=seconds, images_per_sec=n / seconds,
             devices=int(mesh.devices.size))
  if train_counts is not None:
    out['shot_accuracy'] = data_lib.shot_accuracy(hits, per_class,
                                                  train_counts)
  return out


def sample_features(ex: Exported, images, spec: SamplerSpec, seed: int = 0):
  """Generated teacher-space features `[N, D]` for `images` (one batch)."""
  sched, settings = _sampling(ex.config.gendd, spec)

  @jax.jit
  def fn(variables, stats, image):
    model = nnx.merge(ex.graphdef, variables['params'],
                      variables['batch_stats'])
    z = model.student(image)[0].astype(jnp.float32)
    return gendd.sample_teacher_features(model.head, sched,
                                         jax.random.key(seed), z, settings,
                                         stats)

  return fn(ex.variables, ex.target_stats, jnp.asarray(images))


def eval_batches(ex: Exported, batch_size: int | None = None,
                 data_dir: str | None = None, data: str | None = None,
                 split: str | None = None):
  """The eval split of the export's (or given) config, or `split` of the
  dataset `data`, every image once: this process's slice of each global
  batch, read as it is needed. No other split is opened."""
  d = copy.deepcopy(ex.config.data)
  with d.unlocked():
    if batch_size:
      d.eval_batch_size = batch_size
    if data_dir is not None:
      d.data_dir = paths.expand(data_dir)
    if data:
      d.name, d.eval_name = data, ''
    if split:
      d.eval_split = split
  num_classes, batches = data_lib.open_eval_batches(
      d, ex.config.seed, jax.process_index(), jax.process_count())
  want = int(ex.meta['num_classes'])
  if num_classes and num_classes != want:
    raise data_lib.DataError(
        f'{d.get("eval_name") or d.name}/{d.eval_split} has {num_classes} '
        f'classes; the export classifies {want}')
  return batches()


def main(argv: list[str]) -> None:
  try:
    _evaluate_command(argv)
  except ValueError as e:  # Bad sampler settings or mode, an empty split.
    errors.fail(str(e))


def _evaluate_command(argv: list[str]) -> None:
  if len(argv) > 1:
    errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not common.CHECKPOINT.value:
    errors.fail('--checkpoint=<export dir> is required')
  common.initialize_distributed()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Keep library INFO logs out.
  ex = load(paths.absolute(common.CHECKPOINT.value), common.CONFIG.value)
  modes = modes_of(ex, _MODE.value)
  spec = sampler_spec(ex.config, _SAMPLER.value, _STEPS.value, _CFG.value,
                      _TEMP.value, _NUM.value, common.CLIP_X0.value,
                      ex.meta.get('clip_bound'), _INIT_TEMP.value)
  results = {}
  counts = None
  if ex.config.data.get('shot_groups', False) and not _DATA.value:
    counts = data_lib.train_class_counts(
        ex.config.data, ex.config.seed, int(ex.meta['num_classes']))
  print(f'{ex.stage} export of {ex.meta["model"]} (step '
        f'{ex.meta.get("step")}), {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s)', flush=True)
  for mode in modes:
    res = evaluate(ex, eval_batches(ex, common.BATCH_SIZE.value,
                                    common.DATA_DIR.value, _DATA.value,
                                    _SPLIT.value),
                   mode, spec, common.SEED.value, _MAX_BATCHES.value,
                   train_counts=counts)
    if mode == 'sample':
      res['sampler'] = spec._asdict()
    results[mode] = res
    clip = describe_clip(spec.clip_x0)
    steps = ('1 call' if spec.sampler == 'posterior_mean' else
             f'{spec.steps} steps')
    init = ('' if spec.init_temperature == 1.0 else
            f', x_T x{spec.init_temperature:g}')
    detail = (f' ({spec.sampler}, {steps}, cfg '
              f'{spec.cfg_scale:g}, T {spec.temperature:g}{init}, '
              f'{spec.num_sampling} draw(s){clip})' if mode == 'sample'
              else '')
    print(f'{mode}{detail}: top-1 {res["top1"]:.2f}%  top-5 '
          f'{res["top5"]:.2f}%  {res["images_per_sec"]:.1f} images/s '
          f'({res["images"]} images)', flush=True)
    if 'shot_accuracy' in res:
      print(f'{mode} by shot group: ' + ', '.join(
          f'{g} {v:.2f}%' for g, v in res['shot_accuracy'].items()),
            flush=True)
  if common.OUT.value and jax.process_index() == 0:
    paths.write_text(paths.absolute(common.OUT.value),
                     json.dumps(results, indent=1))


def entry() -> None:
  """The `gendd-evaluate` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
