r"""Throughput benchmark: train-step and evaluation images/s, printed as JSON.

  python -m benchmarks.bench [--settings=digits,head_only,cifar] [--repeats=5]
  python -m benchmarks.bench --settings=head_only,cifar --reference_dir=PATH

Settings:
  digits     the bundled example's GenDD stage (teacher MLP + student MLP +
             diffusion head) and its sampling evaluation;
  head_only  the ImageNet ResNet-50 teacher geometry without backbones:
             feature width 2048, token_dim 64, width 1024, depth 3,
             diffusion_batch_mul 10, batch 32, random features; evaluation is
             64-step CFG (scale 2) sampling at batch 32;
  cifar      the CIFAR-100 GenDD step of the paper: resnet32x4 teacher
             forward + resnet8x4 student + diffusion head (token_dim 64,
             width 1024, depth 3, diffusion_batch_mul 30, batch 64) and
             100-step CFG (scale 2) evaluation at batch 64;
  cifar_precomputed  the same step with precomputed teacher features in the
             batch (`teacher.source = 'precomputed'`): no teacher forward;
  imagenet, imagenet_precomputed  the train step of BEiT-v2-L -> ResNet-50
             at 224x224 (head token 64, width 1024, depth 3, mul 10, batch
             8), with and without the teacher forward (not run by default).
Each figure is the median over `repeats` timed runs after compilation.

Work and efficiency: every timed part reports `gflop_per_image`, the
floating-point operations of its matrix products and convolutions (2 per
multiply-add, backward included) counted from the step's jaxpr, loops
multiplied by their trip counts (`matmul_flops`); train steps also report
XLA's own cost analysis (`xla_gflop_per_image`, which adds elementwise
work). `gflops_per_sec` is that work over the measured time and
`pct_of_peak` its share of the machine's FP32 matrix-product peak, measured
in the same run (`matmul_peak`: chains of products of large square and of
the steps' own shapes, through JAX and, with a reference, torch; the best).

`--reference_dir=PATH` (a local copy of the authors' PyTorch code, see
`bench_reference`) runs their implementation of `head_only` and `cifar` in
the same invocation with the same batch, widths, steps, CFG scale and
repeats, float32, and reports their images/s, their counted work and the
ratios ours / theirs. For `cifar` our trainer's evaluation step also runs the
teacher (a norm diagnostic); the equal-work evaluation (`eval_sampling`:
student, CFG sampling, classifier, as theirs) gives the headline ratio.

Few-step sampling (`few_step`, `FEW_STEP`): the same evaluation with each of
our few-step samplers, against their many-step one: the one-call posterior
mean, and the settings the sampler studies chose at equal accuracy
(docs/samplers.md).
"""

from __future__ import annotations

import collections
import functools
import glob
import importlib.util
import json
import math
import os
import re
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags
from flax import nnx
import jax
from jax import profiler
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import bench_reference
from gendd_jax import config_lib
from gendd_jax import data as data_lib
from gendd_jax import diffusion
from gendd_jax import gendd
from gendd_jax import settings
from gendd_jax import sharding
from gendd_jax import stages
from gendd_jax import teacher as teacher_lib
from gendd_jax import train
from gendd_jax.cli import sweep_sampling
from gendd_jax.flops import matmul_flops
from gendd_jax.models import denoiser

_SETTINGS = flags.DEFINE_list('settings', ['digits', 'head_only', 'cifar'],
                              'Which settings to run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats per figure.')
_STEPS = flags.DEFINE_integer('train_steps', 5,
                             'Train steps per timed repeat.')
_REFERENCE = flags.DEFINE_string(
    'reference_dir', '', 'Path of a local copy of the authors\' PyTorch code '
    '(holding GenDD_cifar/); times it on head_only and cifar too.')
_TORCH_THREADS = flags.DEFINE_integer(
    'torch_threads', 0, 'torch intra-op threads (0: every core, as XLA).')
_PEAK = flags.DEFINE_bool('peak', True,
                          'Measure the FP32 matrix-product peak.')
_TABLE_FROM = flags.DEFINE_string(
    'table_from', '', 'Only print the markdown table of this results JSON.')
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', '', 'Trace one extra call of each head_only/cifar part '
    'there and report where its time goes.')


class FewStep(NamedTuple):
  """A few-step sampler, timed against the reference's many-step one.

  `clip_x0` as `sampler.clip_x0`; 'data' and dynamic thresholding take the
  bound of the setting's training targets.
  """
  name: str
  sampler: str
  steps: str
  cfg_scale: float = 2.0
  temperature: float = 1.0
  init_temperature: float = 1.0
  clip_x0: str = 'none'

  def network_calls(self) -> int:
    """Network calls per token (two a step with guidance)."""
    return sweep_sampling.cost(self.sampler, self.steps, self.cfg_scale)

  def describe(self) -> str:
    noise = ('deterministic' if self.temperature == 0 and
             self.init_temperature == 0 else 'noisy')
    if self.sampler == 'posterior_mean':
      return f'posterior mean, CFG {self.cfg_scale:g}'
    return (f'{self.sampler} {self.steps}, {noise}, CFG {self.cfg_scale:g}, '
            f'clip {self.clip_x0}')

  def settings(self, base: gendd.SampleSettings, bound: Any
               ) -> gendd.SampleSettings:
    clip = gendd.parse_clip_x0(self.clip_x0)
    clip = bound if clip == 'data' else gendd.with_bound(clip, bound)
    return base._replace(sampler=self.sampler, cfg_scale=self.cfg_scale,
                         temperature=self.temperature,
                         init_temperature=self.init_temperature,
                         clip_x0=clip)

  def record(self) -> dict[str, Any]:
    return dict(self._asdict(), network_calls=self.network_calls(),
                description=self.describe())


# The few-step samplers timed beside the reference's: the one-call posterior
# mean (throughput only: 10.7 points below the best sampler on the digits),
# and the sampler studies' choices, each the cheapest setting within 0.2
# points of the best measured on its run (docs/samplers.md): 4 deterministic
# trailing steps with dynamic thresholding, CFG 2 on the digits, unguided on
# the CIFAR-style run.
FEW_STEP = (
    FewStep('posterior_mean', 'posterior_mean', '1'),
    FewStep('digits_choice', 'ancestral', 'trailing4', 2.0, 0.0, 0.0,
            'dynamic'),
    FewStep('cifar_style_choice', 'ancestral', 'trailing4', 1.0, 0.0, 0.0,
            'dynamic'),
)


def _few_step_part(rate: dict, work: dict, images: int, fs: FewStep
                   ) -> dict:
  return dict(_with_work(rate, work, images), setting=fs.record())


# Settings the reference runner implements (cifar_precomputed reuses cifar's
# reference figures: their code has no precomputed-teacher mode).
_REFERENCE_OF = dict(head_only='head_only', cifar='cifar',
                     cifar_precomputed='cifar')


def median_rate(fn, images_per_call: int, calls: int, repeats: int
                ) -> dict[str, float]:
  """Images/s of `calls` calls of `fn` (which blocks), median of repeats."""
  fn()  # Compile and warm up.
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      fn()
    rates.append(images_per_call * calls / (time.perf_counter() - t0))
  return dict(images_per_sec=statistics.median(rates),
              min=min(rates), max=max(rates))


# ---------------------------------------------------------------------------
# Work: FLOPs of matrix products and convolutions (`flops.matmul_flops`).
# ---------------------------------------------------------------------------


def step_work(fn, *args, xla: bool = False) -> dict[str, float]:
  """`{flops}` of one call of `fn(*args)` (jaxpr count) and, with `xla`,
  `xla_flops` from the compiled program's cost analysis."""
  out = dict(flops=float(matmul_flops(jax.make_jaxpr(fn)(*args))))
  if xla:
    jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per device.
      cost = cost[0]
    if cost and 'flops' in cost:
      out['xla_flops'] = float(cost['flops'])
  return out


def _with_work(rate: dict, work: dict, images_per_call: int) -> dict:
  """Adds per-image GFLOPs and achieved GFLOP/s to a `median_rate` dict."""
  rate = dict(rate)
  per_image = work['flops'] / images_per_call
  rate['gflop_per_image'] = per_image / 1e9
  rate['gflops_per_sec'] = per_image * rate['images_per_sec'] / 1e9
  if 'xla_flops' in work:
    rate['xla_gflop_per_image'] = work['xla_flops'] / images_per_call / 1e9
  return rate


# ---------------------------------------------------------------------------
# Where time goes: a jax.profiler trace joined with the compiled HLO.
# ---------------------------------------------------------------------------

_SHAPE = re.compile(r'^\s*(?:ROOT )?%([\w.-]+) = \w+\[([\d,]*)\]')
_OPERANDS = re.compile(r'(?:dot|convolution)\(%([\w.-]+), %([\w.-]+)\)')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(',') if d]


def _instruction_flops(line: str, shapes: dict[str, list[int]]) -> float:
  """FLOPs of one HLO `dot` or `convolution` line (0 for anything else)."""
  m = _SHAPE.match(line)
  ops = _OPERANDS.search(line)
  if not m or not ops:
    return 0.0
  out = math.prod(_dims(m.group(2)))
  lhs, rhs = shapes.get(ops.group(1)), shapes.get(ops.group(2))
  if lhs is None or rhs is None:
    return 0.0
  if ' dot(' in line:
    contract = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line)
    k = math.prod(lhs[int(d)] for d in _dims(contract.group(1)))
    return 2.0 * out * k
  labels = re.search(r'dim_labels=\w+_(\w+)->', line).group(1)
  per_output = math.prod(rhs) // rhs[labels.index('o')]
  dilate = re.search(r'lhs_dilate=([\dx]+)', line)
  div = math.prod(int(d) for d in dilate.group(1).split('x')) if dilate else 1
  return 2.0 * out * per_output / div


def hlo_op_flops(hlo_text: str) -> dict[str, tuple[float, str, str]]:
  """`{instruction: (FLOPs, output shape, 'dot' or 'conv')}` for every
  instruction of an optimised HLO module that is, or fuses, a dot or a
  convolution."""
  comp_flops, shapes, calls, out_shape = {}, {}, {}, {}
  conv_comps, conv_ops = set(), set()
  # Bodies of fusions count through their fusion instruction only.
  fused = set(re.findall(r' fusion\(.*?calls=%([\w.-]+)', hlo_text))
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r'^(?:ENTRY )?%([\w.-]+) \(', line)
    if head:
      current = head.group(1)
      comp_flops[current] = 0.0
      continue
    m = _SHAPE.match(line)
    if not m or current is None:
      continue
    shapes[m.group(1)] = _dims(m.group(2))
    out_shape[m.group(1)] = m.group(2)
    flops = _instruction_flops(line, shapes)
    comp_flops[current] += flops
    if flops and ' convolution(' in line:
      conv_comps.add(current)
      conv_ops.add(m.group(1))
    if flops and current not in fused:
      calls[m.group(1)] = ('', flops)
    called = re.search(r'calls=%([\w.-]+)', line)
    if called:
      calls[m.group(1)] = (called.group(1), 0.0)
  out = {}
  for name, (comp, flops) in calls.items():
    total = flops + comp_flops.get(comp, 0.0)
    if total:
      conv = name in conv_ops or comp in conv_comps
      out[name] = (total, out_shape[name], 'conv' if conv else 'dot')
  return out


def profile_call(jitted, args: tuple, trace_dir: str, top: int = 6
                 ) -> dict[str, Any]:
  """Traces one call of `jitted(*args)` with `jax.profiler` and sums the
  executed operations' times (over the CPU client's threads) into matrix
  products and convolutions versus everything else, with the costliest of
  each and the products' achieved GFLOP/s."""
  ops = hlo_op_flops(jitted.lower(*args).compile().as_text())
  jax.block_until_ready(jitted(*args))
  os.makedirs(trace_dir, exist_ok=True)
  t0 = time.perf_counter()
  with profiler.trace(trace_dir):
    jax.block_until_ready(jitted(*args))
  wall = time.perf_counter() - t0
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                           recursive=True), key=os.path.getmtime)
  data = profiler.ProfileData.from_file(files[-1])
  times, counts = collections.Counter(), collections.Counter()
  for plane in data.planes:
    if plane.name != '/host:CPU':
      continue
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):  # XLA's threads only.
        continue
      for ev in line.events:
        # Executor bookkeeping, and control-flow thunks (which contain their
        # bodies' events), are not operations of their own.
        # Python frames ('$file.py:line fn') are the caller's, not XLA's.
        if ev.name.startswith(('ThunkExecutor', 'end: ', 'Slinky', '$')) or (
            re.fullmatch(r'(while|conditional|call)(\.\d+)?', ev.name)):
          continue
        times[ev.name] += ev.duration_ns / 1e9
        counts[ev.name] += 1
  matmul = {k: v for k, v in times.items() if k in ops}
  other = {k: v for k, v in times.items() if k not in ops}
  flops = sum(ops[k][0] * counts[k] for k in matmul)

  def listing(d, with_flops):
    rows = []
    for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]:
      row = dict(op=k, seconds=v, calls=counts[k])
      if with_flops:
        row.update(shape=ops[k][1],
                   gflops_per_sec=ops[k][0] * counts[k] / v / 1e9)
      rows.append(row)
    return rows

  # Operations run one per thread, several at once: rates are per thread.
  return dict(
      traced_wall_seconds=wall,
      op_seconds=sum(times.values()),
      matmul_seconds=sum(matmul.values()),
      conv_seconds=sum(v for k, v in matmul.items() if ops[k][2] == 'conv'),
      conv_gflop=sum(ops[k][0] * counts[k] for k in matmul
                     if ops[k][2] == 'conv') / 1e9,
      matmul_gflop=flops / 1e9,
      other_seconds=sum(other.values()),
      matmul_gflops_per_op_second=flops / max(sum(matmul.values()), 1e-9)
      / 1e9,
      top_matmul=listing(matmul, True), top_other=listing(other, False))


# ---------------------------------------------------------------------------
# Machine peak.
# ---------------------------------------------------------------------------

# (m, k, n): large square products, then the head's row products at the
# benchmark settings (train rows M*B*K, sampling rows B*K; width 1024).
PEAK_SHAPES = ((2048, 2048, 2048), (10240, 1024, 3072), (7680, 1024, 1024),
               (1024, 1024, 3072), (256, 1024, 3072))


def _chain_length(m: int, k: int, n: int, target_flops: float = 2e10) -> int:
  return max(1, round(target_flops / (4 * m * k * n)))


def matmul_peak(shapes=PEAK_SHAPES, repeats: int = 5, torch=None,
                chain_flops: float = 2e10) -> dict[str, Any]:
  """Best FP32 matrix-product GFLOP/s over `shapes`, through JAX and (if
  given) torch.

  Each figure times a chain `x <- (x @ A) @ B` ([m, k] @ [k, n] @ [n, k])
  of about `chain_flops` in one call, so buffers are reused and dispatch is
  amortised; the best of `repeats` calls.
  """
  rng = np.random.default_rng(0)
  rows = []
  for m, k, n in shapes:
    steps = _chain_length(m, k, n, chain_flops)
    x = rng.normal(size=(m, k)).astype(np.float32)
    a = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    b = (rng.normal(size=(n, k)) / np.sqrt(n)).astype(np.float32)
    flops = 4.0 * steps * m * k * n

    @jax.jit
    def chain(x, a, b, steps=steps):
      return jax.lax.fori_loop(0, steps, lambda _, h: (h @ a) @ b, x)

    args = [jax.device_put(v) for v in (x, a, b)]
    row = dict(shape=[m, k, n], jax=flops / _best_time(
        lambda: chain(*args).block_until_ready(), repeats) / 1e9)
    if torch is not None:
      tx, ta, tb = (torch.from_numpy(v) for v in (x, a, b))
      o1, o2 = torch.empty(m, n), torch.empty(m, k)

      def torch_chain(tx=tx, ta=ta, tb=tb, o1=o1, o2=o2, steps=steps):
        h = tx
        for _ in range(steps):
          torch.mm(h, ta, out=o1)
          torch.mm(o1, tb, out=o2)
          h = o2

      row['torch'] = flops / _best_time(torch_chain, repeats) / 1e9
    rows.append(row)
  best = max(max(v for k, v in r.items() if k != 'shape') for r in rows)
  return dict(gflops_per_sec=best, shapes=rows)


def _best_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


# ---------------------------------------------------------------------------
# The authors' implementation, same settings.
# ---------------------------------------------------------------------------


def run_reference(ref, make_parts: Callable[[int], dict[str, Callable]],
                  batch: int, repeats: int, steps: int) -> dict[str, Any]:
  """Times `make_parts(batch)` (`bench_reference.*_parts`) as ours are
  timed, and counts their work."""
  work = bench_reference.flops_at(ref, make_parts, batch)
  parts = make_parts(batch)
  out = dict(torch=ref.torch.__version__,
             torch_threads=ref.torch.get_num_threads())
  for part, calls in (('train', steps), ('eval', 1)):
    rate = median_rate(parts[part], batch, calls, repeats)
    out[part] = _with_work(rate, work[part], batch)
    out[part]['flops_linearity_error'] = work[part]['linearity_error']
  return out


def bench_head_only(repeats: int, steps: int, *, feature_dim=2048,
                    token_dim=64, width=1024, depth=3, mul=10, batch=32,
                    sampling_steps='64', cfg_scale=2.0,
                    few_step: tuple[FewStep, ...] = FEW_STEP,
                    reference=None,
                    profile_dir: str | None = None) -> dict:
  """GenDD head training and sampling on random 2048-d features; with
  `reference` (`bench_reference.load`), the authors' code too; with
  `profile_dir`, a traced breakdown of each part (`profile_call`).

  `eval` is `sampling_steps`-step ancestral CFG sampling (the reference's
  evaluation); `few_step[name]` each few-step sampler of `few_step`, x0
  bounds from the random training targets."""

  class HeadOnly(nnx.Module):

    def __init__(self, rngs):
      self.cls_projector = nnx.LayerNorm(feature_dim, epsilon=1e-5,
                                         rngs=rngs)
      self.head = denoiser.DenoiserMLP(token_dim, feature_dim, width, depth,
                                       feature_dim // token_dim, rngs=rngs)

  graphdef, params = nnx.split(HeadOnly(nnx.Rngs(0)))
  tx = optax.adamw(1e-4, b2=0.96, weight_decay=0.0)
  opt_state = tx.init(params)
  train_sched = diffusion.create_schedule('cosine', 1000, '')
  sample_sched = diffusion.create_schedule('cosine', 1000, sampling_steps)
  loss_settings = gendd.LossSettings(token_dim, mul, 0.2, True)
  sample_settings = gendd.SampleSettings(token_dim, 1, cfg_scale, 1.0)
  keys = jax.random.split(jax.random.key(0), 3)
  feat_s = jax.random.normal(keys[0], (batch, feature_dim))
  feat_t = jax.random.normal(keys[1], (batch, feature_dim))
  bound = jnp.max(jnp.abs(feat_t))

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      z = m.cls_projector(feat_s)
      return gendd.diffusion_loss(m.head, train_sched, key, z, feat_t,
                                  loss_settings)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def sample_step(params, key):
    m = nnx.merge(graphdef, params)
    return gendd.sample_features(m.head, sample_sched, key,
                                 m.cls_projector(feat_s), sample_settings)

  def make_few_step(fs: FewStep):
    sched = gendd.sampling_schedule('cosine', 1000, fs.steps, fs.sampler)
    sample = fs.settings(sample_settings, bound)

    @jax.jit
    def sample_few(params, key):
      m = nnx.merge(graphdef, params)
      return gendd.sample_features(m.head, sched, key,
                                   m.cls_projector(feat_s), sample)

    def once():
      sample_few(state['p'], keys[2]).block_until_ready()

    return sample_few, once

  state = {'p': params, 'o': opt_state, 'k': 0}

  def train_once():
    state['k'] += 1
    p, o, loss = train_step(state['p'], state['o'],
                            jax.random.key(state['k']))
    state['p'], state['o'] = p, o
    loss.block_until_ready()

  def sample_once():
    sample_step(state['p'], keys[2]).block_until_ready()

  train_work = step_work(train_step, params, opt_state, keys[2], xla=True)
  eval_work = step_work(sample_step, params, keys[2])
  out = dict(
      setting=dict(feature_dim=feature_dim, token_dim=token_dim, width=width,
                   depth=depth, diffusion_batch_mul=mul, batch=batch,
                   sampling_steps=sampling_steps, cfg_scale=cfg_scale),
      train=_with_work(median_rate(train_once, batch, steps, repeats),
                       train_work, batch),
      eval=_with_work(median_rate(sample_once, batch, 1, repeats),
                      eval_work, batch),
      few_step={})
  for fs in few_step:
    fn, once = make_few_step(fs)
    out['few_step'][fs.name] = _few_step_part(
        median_rate(once, batch, 1, repeats), step_work(fn, params, keys[2]),
        batch, fs)
  if profile_dir:
    out['train']['profile'] = profile_call(
        train_step, (state['p'], state['o'], keys[2]),
        os.path.join(profile_dir, 'head_only_train'))
    out['eval']['profile'] = profile_call(
        sample_step, (state['p'], keys[2]),
        os.path.join(profile_dir, 'head_only_eval'))
  if reference is not None:
    if cfg_scale != 2.0:
      raise ValueError('the reference evaluates at CFG scale 2 only')
    out['reference'] = run_reference(
        reference, functools.partial(
            bench_reference.head_only_parts, reference,
            feature_dim=feature_dim, token_dim=token_dim, width=width,
            depth=depth, mul=mul, sampling_steps=sampling_steps),
        batch, repeats, steps)
  return out


def _bench_gendd(config, info, train_batch, eval_images, repeats: int,
                 steps: int, precomputed: bool = False,
                 equal_work_eval: bool = False,
                 profile_dir: str | None = None,
                 few_step: tuple[FewStep, ...] = FEW_STEP) -> dict:
  """Times the full GenDD train step and sampling evaluation of `config`
  (randomly initialised teacher and student) on fixed batches; with
  `precomputed`, the batch carries the teacher features and the step runs
  no teacher forward (`teacher.source = 'precomputed'`); with
  `equal_work_eval`, also the evaluation without the teacher
  (`eval_sampling`) and the same with each few-step sampler of `few_step`
  (`few_step[name]`; x0 bounds from the teacher's features of the train
  batch)."""

  config.stage = 'gendd'
  config.sampler.also_eval_clipped = False  # Time one sampler pass.
  mesh = sharding.create_mesh(1)
  teacher_module = stages.create_backbone(config.teacher, info, 0)
  t_graphdef, t_params, t_bs = nnx.split(teacher_module, nnx.Param,
                                         nnx.BatchStat)
  module = stages.get('gendd').create_model(config, info)
  graphdef = nnx.graphdef(module)
  spec = settings.step_settings(config, 'gendd', 100, precomputed)
  t_model = nnx.merge(t_graphdef, t_params, t_bs)
  t_feature = np.asarray(jax.jit(lambda x: t_model(x)[0])(
      train_batch['image']))
  if precomputed:
    train_batch = dict(train_batch, teacher_feature=t_feature)
  train_step, eval_step = train.jitted_steps(spec, mesh)
  rep = sharding.replicated(mesh)
  teacher = teacher_lib.Teacher(
      variables=jax.device_put(dict(params=t_params, batch_stats=t_bs), rep),
      graphdef=t_graphdef, precomputed=precomputed)
  if spec.clip_to_data or spec.also_clipped:
    teacher = teacher.replace(
        clip_bound=jax.device_put(jnp.float32(1.0), rep))
  state = {'s': train.create_train_state(module, spec.optim, mesh)}
  batch = sharding.shard_batch(train_batch, mesh)
  eval_in = sharding.shard_batch({'image': eval_images}, mesh)
  n_train, n_eval = len(train_batch['image']), len(eval_images)

  def train_once():
    state['s'], metrics = train_step(state['s'], teacher, batch)
    jax.block_until_ready(metrics['loss'])

  def eval_once():
    jax.block_until_ready(eval_step(state['s'], teacher, eval_in,
                                    jnp.int32(0)))

  def make_sampling_eval(sampling_steps: str, sample: gendd.SampleSettings):
    """Student, CFG sampling and the teacher's classifier: the work of the
    reference's evaluation (the trainer's `eval_step` also runs the
    teacher, for a norm diagnostic)."""
    sched = gendd.sampling_schedule(spec.noise_schedule, spec.diffusion_steps,
                                    sampling_steps, sample.sampler)

    @jax.jit
    def sampling_eval(state, teacher, images):
      model = nnx.merge(graphdef, state.params, state.batch_stats)
      z = model.student(images)[0].astype(jnp.float32)
      w, b = teacher.classifier()
      logits, _ = gendd.sampled_logits(model.head, sched, jax.random.key(1),
                                       z, sample, w, b)
      return jnp.argmax(logits, -1)

    def once():
      jax.block_until_ready(sampling_eval(state['s'], teacher,
                                          eval_in['image']))

    return sampling_eval, once

  sampling_eval, sampling_once = make_sampling_eval(spec.sampling_steps,
                                                    spec.sample)
  bound = jnp.float32(np.abs(t_feature).max())

  g, smp = config.gendd, config.sampler
  out = dict(
      setting=dict(teacher=config.teacher.model, student=config.student.model,
                   teacher_source='precomputed' if precomputed else 'model',
                   batch=n_train, eval_batch=n_eval, token_dim=g.token_dim,
                   width=g.width, depth=g.depth,
                   diffusion_batch_mul=g.diffusion_batch_mul,
                   sampling_steps=smp.steps, cfg_scale=smp.cfg_scale,
                   num_sampling=smp.num_sampling),
      train=_with_work(median_rate(train_once, n_train, steps, repeats),
                       step_work(train_step, state['s'], teacher, batch,
                                 xla=True), n_train),
      eval=None)
  if n_eval:
    out['eval'] = _with_work(
        median_rate(eval_once, n_eval, 1, repeats),
        step_work(eval_step, state['s'], teacher, eval_in, jnp.int32(0)),
        n_eval)
  if n_eval and equal_work_eval:
    out['eval_sampling'] = _with_work(
        median_rate(sampling_once, n_eval, 1, repeats),
        step_work(sampling_eval, state['s'], teacher, eval_in['image']),
        n_eval)
    out['few_step'] = {}
    for fs in few_step:
      fn, once = make_sampling_eval(fs.steps, fs.settings(spec.sample, bound))
      out['few_step'][fs.name] = _few_step_part(
          median_rate(once, n_eval, 1, repeats),
          step_work(fn, state['s'], teacher, eval_in['image']), n_eval, fs)
  if profile_dir:
    name = config.teacher.model + ('_precomputed' if precomputed else '')
    # Called inside another jit, the step donates nothing: the traced calls
    # leave the state intact.
    out['train']['profile'] = profile_call(
        jax.jit(lambda s, t, b: train_step(s, t, b)),
        (state['s'], teacher, batch),
        os.path.join(profile_dir, f'{name}_train'))
    if 'eval_sampling' in out:
      out['eval_sampling']['profile'] = profile_call(
          sampling_eval, (state['s'], teacher, eval_in['image']),
          os.path.join(profile_dir, f'{name}_eval_sampling'))
  return out


def bench_digits(repeats: int, steps: int) -> dict:
  """The digits config's GenDD stage: full train step and evaluation."""

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                      'digits.py')
  spec_ = importlib.util.spec_from_file_location('digits_config', path)
  mod = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(mod)
  config = mod.get_config()
  d = config.data
  tr, te, info = data_lib.create_splits(
      d.name, fold=0, num_folds=d.num_folds, label_fraction=d.label_fraction,
      seed=0)
  batches = data_lib.TrainBatches(tr, d.batch_size, 0)
  eval_batch = next(data_lib.eval_batches(te, d.eval_batch_size))
  return _bench_gendd(config, info, batches.batch(0), eval_batch['image'],
                      repeats, steps)


def bench_cifar(repeats: int, steps: int, *, teacher='resnet32x4',
                student='resnet8x4', batch=64, eval_batch=64, width=1024,
                depth=3, mul=30, sampling_steps='100',
                precomputed: bool = False, reference=None,
                profile_dir: str | None = None) -> dict:
  """The CIFAR-100 GenDD step: teacher forward, student, diffusion head
  (token 64, width 1024, depth 3, diffusion_batch_mul 30, batch 64), and
  100-step CFG evaluation, on random 32x32 images (throughput does not
  depend on the pixels); with `reference`, the authors' code too (at
  `batch`; their evaluation runs at the training batch)."""

  config = config_lib.cifar100(teacher=teacher, student=student)
  config.gendd.width, config.gendd.depth = width, depth
  config.gendd.diffusion_batch_mul = mul
  config.sampler.steps = sampling_steps
  info = dict(num_classes=100, input_shape=(32, 32, 3))
  rng = np.random.default_rng(0)
  train_batch = dict(
      image=rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
      label=rng.integers(0, 100, batch).astype(np.int32),
      label_mask=np.ones(batch, bool))
  eval_images = rng.normal(size=(eval_batch, 32, 32, 3)).astype(np.float32)
  out = _bench_gendd(config, info, train_batch, eval_images, repeats, steps,
                     precomputed, equal_work_eval=True,
                     profile_dir=profile_dir)
  if reference is not None:
    if eval_batch != batch:
      raise ValueError('the reference runs evaluation at the train batch')
    g = config.gendd
    out['reference'] = run_reference(
        reference, functools.partial(
            bench_reference.cifar_parts, reference, teacher=teacher,
            student=student, token_dim=g.token_dim, width=width, depth=depth,
            mul=mul, sampling_steps=sampling_steps, smooth=float(g.smooth),
            beta=float(g.beta)),
        batch, repeats, steps)
  return out


def bench_imagenet(repeats: int, steps: int, *,
                   teacher='beitv2_large_patch16_224', student='resnet50',
                   batch=8, image_size=224, width=1024, depth=3, mul=10,
                   precomputed: bool = False) -> dict:
  """The ImageNet GenDD train step of the paper's strongest pair (BEiT-v2-L
  teacher, ResNet-50 student, head token 64 / width 1024 / depth 3 / mul
  10), with or without the teacher forward; training only (evaluation does
  not depend on where the training targets come from)."""

  config = config_lib.cifar100(teacher=teacher, student=student)
  config.gendd.width, config.gendd.depth = width, depth
  config.gendd.diffusion_batch_mul = mul
  config.sampler.steps = '64'
  info = dict(num_classes=1000, input_shape=(image_size, image_size, 3))
  rng = np.random.default_rng(0)
  train_batch = dict(
      image=rng.normal(size=(batch, image_size, image_size, 3)).astype(
          np.float32),
      label=rng.integers(0, 1000, batch).astype(np.int32),
      label_mask=np.ones(batch, bool))
  eval_images = np.zeros((0, image_size, image_size, 3), np.float32)
  return _bench_gendd(config, info, train_batch, eval_images, repeats, steps,
                      precomputed)


def ratios(ours: dict, theirs: dict) -> dict[str, float]:
  """Images/s ours / theirs per part; `eval` compares equal work (our
  `eval_sampling` where present), `eval_step` the trainer's evaluation,
  `few_step/<name>` each of our few-step samplers against their many-step
  one."""
  out = dict(train=ours['train']['images_per_sec'] /
             theirs['train']['images_per_sec'])
  if ours.get('eval'):
    eq = ours.get('eval_sampling') or ours['eval']
    out['eval'] = eq['images_per_sec'] / theirs['eval']['images_per_sec']
    if 'eval_sampling' in ours:
      out['eval_step'] = (ours['eval']['images_per_sec'] /
                          theirs['eval']['images_per_sec'])
  for name, part in (ours.get('few_step') or {}).items():
    out[f'few_step/{name}'] = (part['images_per_sec'] /
                               theirs['eval']['images_per_sec'])
  return out


def _annotate_peak(result: dict, peak: float) -> None:
  """Adds `pct_of_peak` to every timed part with a FLOP rate."""
  parts = [*result.values(), *(result.get('few_step') or {}).values(),
           *(result.get('reference') or {}).values()]
  for part in parts:
    if isinstance(part, dict) and 'gflops_per_sec' in part:
      part['pct_of_peak'] = 100.0 * part['gflops_per_sec'] / peak


def summary_table(result: dict) -> str:
  """Markdown table of a `bench` JSON result: ours vs the reference."""
  peak = result.get('peak', {}).get('gflops_per_sec')
  head = ('| setting | part | ours images/s | reference images/s | ratio | '
          'ours GFLOP/image | reference GFLOP/image | ours GFLOP/s '
          '(% of peak) | reference GFLOP/s (% of peak) |')
  lines = [head, '|' + '---|' * 9]

  def rate(part):
    if not part or 'gflops_per_sec' not in part:
      return '—'
    pct = part.get('pct_of_peak')
    return (f'{part["gflops_per_sec"]:.0f}' +
            (f' ({pct:.0f}%)' if pct is not None else ''))

  for name, res in result.items():
    if not isinstance(res, dict) or 'train' not in res:
      continue
    theirs = res.get('reference') or {}
    ratio = res.get('ratio') or {}
    # (our part, label, their part, ratio key)
    rows = [('train', 'train step', 'train', 'train')]
    if res.get('eval_sampling'):
      rows += [('eval_sampling', 'CFG evaluation', 'eval', 'eval'),
               ('eval', 'trainer eval step (+ teacher)', 'eval',
                'eval_step')]
    elif res.get('eval'):
      rows.append(('eval', 'CFG evaluation', 'eval', 'eval'))
    their_steps = res.get('setting', {}).get('sampling_steps', '?')
    for few, part in (res.get('few_step') or {}).items():
      fs = part['setting']
      rows.append((('few_step', few),
                   f'{fs["description"]} ({fs["network_calls"]} calls) vs '
                   f'their {their_steps} steps', 'eval', f'few_step/{few}'))
    for key, label, ref_key, ratio_key in rows:
      ours = res[key[0]][key[1]] if isinstance(key, tuple) else res[key]
      ref_part = theirs.get(ref_key)
      r = ratio.get(ratio_key)
      lines.append(
          f'| {name} | {label} | {ours["images_per_sec"]:.2f} | ' +
          (f'{ref_part["images_per_sec"]:.2f}' if ref_part else '—') +
          f' | {f"{r:.2f}x" if r else "—"} | '
          f'{ours.get("gflop_per_image", 0):.1f} | ' +
          (f'{ref_part["gflop_per_image"]:.1f}' if ref_part else '—') +
          f' | {rate(ours)} | {rate(ref_part)} |')
  if peak:
    lines.append('')
    lines.append(f'Measured FP32 matrix-product peak: {peak:.0f} GFLOP/s.')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _TABLE_FROM.value:
    with open(_TABLE_FROM.value) as f:
      print(summary_table(json.load(f)))
    return
  out = dict(machine=dict(platform=platform.platform(),
                          processor=platform.processor(),
                          cpu_count=os.cpu_count(),
                          jax=jax.__version__,
                          devices=[str(d) for d in jax.devices()]),
             repeats=_REPEATS.value, steps=_STEPS.value,
             loadavg_start=list(os.getloadavg()))
  runners = dict(digits=bench_digits, head_only=bench_head_only,
                 cifar=bench_cifar,
                 cifar_precomputed=functools.partial(bench_cifar,
                                                     precomputed=True),
                 imagenet=bench_imagenet,
                 imagenet_precomputed=functools.partial(bench_imagenet,
                                                        precomputed=True))
  for name in _SETTINGS.value:
    if name not in runners:
      raise app.UsageError(f'unknown setting {name!r}; expected one of '
                           f'{", ".join(runners)}')
  ref = None
  if _REFERENCE.value:
    ref = bench_reference.load(_REFERENCE.value)
    bench_reference.set_threads(ref, _TORCH_THREADS.value or None)
    out['reference'] = dict(path_given=True, torch=ref.torch.__version__,
                            torch_threads=ref.torch.get_num_threads())
  peaks = []
  if _PEAK.value:
    peaks.append(matmul_peak(repeats=_REPEATS.value,
                             torch=ref.torch if ref else None))
  ref_results = {}
  for name in _SETTINGS.value:
    kwargs = {}
    if _PROFILE_DIR.value and name in ('head_only', 'cifar',
                                       'cifar_precomputed'):
      kwargs['profile_dir'] = _PROFILE_DIR.value
    target = _REFERENCE_OF.get(name) if ref else None
    if target and target not in ref_results:
      kwargs['reference'] = ref
    res = dict(loadavg_start=list(os.getloadavg()),
               **runners[name](_REPEATS.value, _STEPS.value, **kwargs))
    if target:
      if 'reference' in res:
        ref_results[target] = res['reference']
      else:
        res['reference'] = dict(ref_results[target], reused_from=target)
      res['ratio'] = ratios(res, ref_results[target])
    out[name] = res
  if _PEAK.value:
    peaks.append(matmul_peak(repeats=_REPEATS.value,
                             torch=ref.torch if ref else None))
    peak = max(p['gflops_per_sec'] for p in peaks)
    out['peak'] = dict(gflops_per_sec=peak, start=peaks[0], end=peaks[1])
    for name in _SETTINGS.value:
      _annotate_peak(out[name], peak)
  out['loadavg_end'] = list(os.getloadavg())
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  app.run(main)
