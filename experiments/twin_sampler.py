r"""The twin experiment: our diffusion head and the authors', trained on the
same (condition, target) rows, sampled with the paper's sampler.

On the bundled digits example the paper's sampler (ancestral, classifier-free
guidance 2, no x0 clipping) produces features far larger than the teacher's.
This experiment asks whether that belongs to the port or to the method at
this budget, and how it changes with training length.

  python -m experiments.twin_sampler \
      --reference_dir=/tmp/gendd_ref/GenDD_cifar \
      --output_prefix=docs/results/twin_sampler

`--reference_dir` is a local copy of the authors' code (the directory holding
`GenDD_cifar/`, or that directory); nothing of it is part of this project.
Their modules are imported from there at run time (`benchmarks.bench_reference
.load`); their sampler moves its noise to the GPU unconditionally, so on a
CPU `Tensor.cuda` is the identity while it runs. Without the reference the
script says so and exits non-zero (`--implementations=ours` runs our side
alone).

What runs:
  1. The teacher and stage-1 stages of `--config` (fold `--fold`, seed
     `--data_seed`) are trained once with this package (in `--workdir`,
     reused when already there). The frozen student's feature `f` and the
     teacher's feature `t` (the target; no contraction) are computed for the
     fold's training and test images, with the teacher classifier `W, b`.
  2. For each head seed and each training length, both implementations train
     only the diffusion head on identical batches of (`f`, `t`) rows (the
     same row indices at every step), with the config's gendd-stage
     hyperparameters: tokens, width, depth, diffusion_batch_mul,
     condition dropout, learned variance + VB term, AdamW with the stage's
     lr, warm-up fraction and beta2 ramp, cosine lr over the run's length,
     no weight decay on the head (both projects exempt it). The condition is
     `LayerNorm(f)` at its initial (identity-affine) values: ours applies it
     once beforehand, theirs through its own frozen `cls_projector`.
     Each implementation draws its own timesteps, noise and dropout.
  3. Each trained head is evaluated on the test images:
       * the paper's sampler (ancestral, `sampler.published_steps` respaced
         steps, CFG `sampler.published_cfg_scale`, temperature 1, one draw;
         without those keys `sampler.steps` / `cfg_scale`): ours through
         `gendd.sampled_logits`, theirs through `DiffModel.forward_test_stage2`
         (their `DiffLoss.sample`); top-1 with the teacher classifier and the
         ratio of sample norm to teacher-feature norm;
       * the same sampler with the x0 estimate clipped to the training
         targets' range (the package's `clip_x0='data'`; theirs through
         their `p_sample_loop`'s `denoised_fn`), same initial noise;
       * the epsilon-prediction error `E||eps_hat - eps||^2` per dimension
         at fixed timesteps on held-out token rows, with identical `x_t`
         for both implementations: conditional, unconditional (zero
         condition) and guided (`u + s (c - u)`).
Results go to `<output_prefix>.json`, `.md` and `.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_flags

from benchmarks import bench_reference
from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import diffusion
from gendd_jax import gendd
from gendd_jax import optim
from gendd_jax import pipeline
from gendd_jax import stages
from gendd_jax import train
from gendd_jax.data import memory
from gendd_jax.models import denoiser

IMPLEMENTATIONS = ('ours', 'theirs')


# ---------------------------------------------------------------------------
# Setup and data.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadSetup:
  """The head and optimiser settings both implementations share."""
  token_dim: int
  width: int
  depth: int
  diffusion_batch_mul: int
  cond_drop_prob: float
  use_vb: bool
  noise_schedule: str
  diffusion_steps: int
  sampling_steps: str
  cfg_scale: float
  temperature: float
  lr: float
  warmup_steps: int
  beta2_min: float
  beta2_max: float
  beta2_steps: int
  batch_size: int

  def optim_spec(self) -> optim.OptimSpec:
    """AdamW: the config's linear warm-up, then a constant lr (no decay,
    so every snapshot of a long run is also the end of a shorter one);
    beta2 rises over the config's own run length, then stays; no weight
    decay (the head is exempt)."""
    return optim.OptimSpec(
        lr=self.lr, weight_decay=0.0, total_steps=self.beta2_steps,
        warmup_steps=self.warmup_steps, schedule='constant',
        beta2_min=self.beta2_min, beta2_max=self.beta2_max)


def head_setup(config, num_train: int) -> HeadSetup:
  """The gendd stage's head, sampler and optimiser settings of `config`
  (`num_train` training rows give the steps per epoch).

  Raises:
    ValueError: the config decays the head's weights or uses an optimiser
      other than AdamW (this experiment reproduces neither).
  """
  g, s, st = config.gendd, config.sampler, config.stages.gendd
  # A no-decay entry matching the head's parameter paths ('head').
  if not any(name in 'head' for name in config.no_decay):
    raise ValueError('the config decays the diffusion head; the twin '
                     'experiment assumes it does not (as the reference)')
  if st.optimizer != 'adamw':
    raise ValueError('the twin experiment reproduces AdamW only')
  per_epoch = num_train // config.data.batch_size
  return HeadSetup(
      token_dim=g.token_dim, width=g.width, depth=g.depth,
      diffusion_batch_mul=g.diffusion_batch_mul,
      cond_drop_prob=g.cond_drop_prob, use_vb=g.use_vb,
      noise_schedule=g.noise_schedule, diffusion_steps=g.diffusion_steps,
      # The paper's sampler, whatever the config's default is.
      sampling_steps=str(s.get('published_steps', s.steps)),
      cfg_scale=float(s.get('published_cfg_scale', s.cfg_scale)),
      temperature=1.0, lr=st.lr,
      warmup_steps=int(st.warmup_epochs * per_epoch),
      beta2_min=st.beta2_min, beta2_max=st.beta2_max,
      beta2_steps=int(st.epochs * per_epoch),
      batch_size=config.data.batch_size)


@dataclasses.dataclass(frozen=True)
class Features:
  """Fixed rows both implementations train and are evaluated on.

  Attributes:
    f_train, f_test: `[N, Dz]` frozen student features (before LayerNorm).
    t_train, t_test: `[N, D]` teacher features (the generation targets).
    y_train, y_test: `[N]` labels (only for accuracy).
    weight, bias: `[C, D]`, `[C]` the teacher classifier.
    clip_bound: the training targets' largest magnitude (the package's
      `teacher.clip_bound` without contraction or standardisation).
  """
  f_train: np.ndarray
  t_train: np.ndarray
  y_train: np.ndarray
  f_test: np.ndarray
  t_test: np.ndarray
  y_test: np.ndarray
  weight: np.ndarray
  bias: np.ndarray
  clip_bound: float


def layer_norm(f: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  """The condition LayerNorm at its initial (identity) affine parameters."""
  f = np.asarray(f, np.float64)
  mu = f.mean(-1, keepdims=True)
  var = f.var(-1, keepdims=True)
  return ((f - mu) / np.sqrt(var + eps)).astype(np.float32)


def _load_export(directory: str) -> nnx.Module:
  meta = ckpt_lib.load_export_meta(directory)
  _, _, _, graphdef, params, batch_stats = stages.abstract_model(meta)
  where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree, _ = ckpt_lib.load_export(directory, ckpt_lib.abstract_like(
      dict(params=params, batch_stats=batch_stats), where))
  return nnx.merge(graphdef, tree['model']['params'],
                   tree['model']['batch_stats'])


def prepare_features(config, workdir: str, seed: int, fold: int,
                     log: Callable[[str], None] = print) -> Features:
  """Trains (or reuses) the teacher and stage-1 student of one fold and
  returns their features on the fold's training and test images."""
  unit = os.path.join(workdir, f'seed{seed}', f'fold{fold}')
  for stage in ('teacher', 'stage1'):
    stage_dir = os.path.join(unit, stage)
    if os.path.exists(os.path.join(stage_dir, 'export', 'meta.json')):
      log(f'reusing {stage_dir}')
      continue
    c = pipeline.stage_config(config, stage, seed, fold, unit)
    t0 = time.time()
    res = train.train_and_evaluate(c, stage_dir, quiet=True)
    log(f'{stage}: {res["steps"]} steps, top-1 {res["accuracy"]}, '
        f'{time.time() - t0:.0f} s')
  teacher = _load_export(os.path.join(unit, 'teacher', 'export'))
  student = _load_export(os.path.join(unit, 'stage1', 'export')).backbone
  d = config.data
  tr, te, _ = memory.create_splits(
      d.name, fold=fold, num_folds=d.num_folds,
      label_fraction=d.label_fraction, seed=seed)

  @jax.jit
  def feats(x):
    return student.features(x), teacher(x)[0]

  f_tr, t_tr = (np.asarray(a) for a in feats(tr.images))
  f_te, t_te = (np.asarray(a) for a in feats(te.images))
  w = np.asarray(teacher.fc.kernel[...]).T
  b = np.asarray(teacher.fc.bias[...])
  bound = float(max(np.abs(t_tr).max(), np.abs(w).max()))
  return Features(f_tr, t_tr, np.asarray(tr.labels), f_te, t_te,
                  np.asarray(te.labels), w, b, bound)


def batch_indices(n: int, batch: int, seed: int, start: int, count: int
                  ) -> np.ndarray:
  """Row indices of steps `start .. start+count-1`: `[count, batch]`.

  Each epoch is a fresh permutation (drop-remainder batches), a pure
  function of `(seed, epoch)`, so both implementations see the same rows.
  """
  per_epoch = n // batch
  out = []
  for step in range(start, start + count):
    epoch, i = divmod(step, per_epoch)
    perm = _permutation(n, seed, epoch)
    out.append(perm[i * batch:(i + 1) * batch])
  return np.stack(out).astype(np.int32)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


# ---------------------------------------------------------------------------
# The epsilon-prediction error.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpsProbe:
  """Held-out token rows noised at fixed timesteps.

  Attributes:
    timesteps: `[T]` network timesteps.
    x0: `[R, C]` clean tokens (test images x tokens x draws).
    f: `[R, Dz]` their images' student features.
    token: `[R]` token index.
    noise: `[T, R, C]` the noise.
    x_t: `[T, R, C]` the noised tokens (float64 schedule, then float32).
    alphas_cumprod: `[T]` float64.
  """
  timesteps: np.ndarray
  x0: np.ndarray
  f: np.ndarray
  token: np.ndarray
  noise: np.ndarray
  x_t: np.ndarray
  alphas_cumprod: np.ndarray


def eps_probe(feats: Features, setup: HeadSetup, timesteps, draws: int,
              seed: int = 12345) -> EpsProbe:
  """The fixed inputs of the epsilon-error measurement."""
  tokens = gendd.split_tokens(np.asarray(feats.t_test), setup.token_dim)
  n, k, c = tokens.shape
  x0 = np.tile(tokens.reshape(n * k, c), (draws, 1))
  f = np.tile(np.repeat(feats.f_test, k, axis=0), (draws, 1))
  token = np.tile(np.tile(np.arange(k), n), draws)
  ts = np.asarray([int(t) for t in timesteps], np.int64)
  ac = diffusion.respaced_tables(setup.noise_schedule,
                                 setup.diffusion_steps, '')['alphas_cumprod']
  ac = ac[ts]
  noise = np.random.default_rng(seed).standard_normal(
      (len(ts),) + x0.shape)
  x_t = (np.sqrt(ac)[:, None, None] * x0 +
         np.sqrt(1.0 - ac)[:, None, None] * noise)
  return EpsProbe(ts, x0.astype(np.float32), f.astype(np.float32),
                  token.astype(np.int64), noise.astype(np.float32),
                  x_t.astype(np.float32), ac)


# `(x_t [R, C], t (int), f [R, Dz], token [R], null (bool)) -> eps [R, C]`.
EpsFn = Callable[[np.ndarray, int, np.ndarray, np.ndarray, bool], np.ndarray]


def eps_errors(eps_fn: EpsFn, probe: EpsProbe, cfg_scale: float
               ) -> dict[str, dict[str, float]]:
  """`E||eps_hat - eps||^2` per dimension at each probe timestep.

  Returns:
    `{str(t): {cond, uncond, guided, x0_gain}}`; `x0_gain = (1 - abar) /
    abar` turns an epsilon error into the x0 estimate's error
    (`x0_hat - x0 = -sqrt((1 - abar) / abar) (eps_hat - eps)`).
  """
  out = {}
  for i, t in enumerate(probe.timesteps):
    x, eps = probe.x_t[i], probe.noise[i]
    cond = np.asarray(eps_fn(x, int(t), probe.f, probe.token, False),
                      np.float64)
    uncond = np.asarray(eps_fn(x, int(t), probe.f, probe.token, True),
                        np.float64)
    guided = uncond + cfg_scale * (cond - uncond)
    ab = float(probe.alphas_cumprod[i])
    out[str(int(t))] = dict(
        cond=float(np.mean((cond - eps) ** 2)),
        uncond=float(np.mean((uncond - eps) ** 2)),
        guided=float(np.mean((guided - eps) ** 2)),
        x0_gain=(1.0 - ab) / ab)
  return out


def sample_metrics(feat: np.ndarray, feats: Features) -> dict[str, float]:
  """Top-1 (%) of sampled features with the teacher classifier and the
  ratio of their norm to the teacher feature's (per image; mean, median)."""
  feat = np.asarray(feat, np.float64)
  logits = feat @ feats.weight.T + feats.bias
  ratio = (np.linalg.norm(feat, axis=-1) /
           (np.linalg.norm(feats.t_test, axis=-1) + 1e-12))
  return dict(top1=float(100.0 * np.mean(logits.argmax(-1) == feats.y_test)),
              norm_ratio_mean=float(np.mean(ratio)),
              norm_ratio_median=float(np.median(ratio)),
              finite=bool(np.isfinite(feat).all()))


# ---------------------------------------------------------------------------
# Ours.
# ---------------------------------------------------------------------------


class Ours:
  """This package's head: `gendd.diffusion_loss` to train,
  `gendd.sampled_logits` to sample. `train(n)` continues the run."""

  name = 'ours'

  def __init__(self, feats: Features, setup: HeadSetup, seed: int,
               chunk: int = 500):
    self.feats, self.setup, self.seed, self.chunk = feats, setup, seed, chunk
    s = setup
    num_tokens = feats.t_train.shape[1] // s.token_dim
    head = denoiser.DenoiserMLP(s.token_dim, feats.f_train.shape[1],
                                s.width, s.depth, num_tokens,
                                rngs=nnx.Rngs(seed))
    self.graphdef, self.params = nnx.split(head)
    tx = optim.create_optimizer(s.optim_spec())
    self.opt_state = tx.init(self.params)
    self.step = 0
    self.losses: list[float] = []
    schedule = diffusion.create_schedule(s.noise_schedule, s.diffusion_steps,
                                         '')
    loss_settings = gendd.LossSettings(s.token_dim, s.diffusion_batch_mul,
                                       s.cond_drop_prob, s.use_vb)
    key = jax.random.key(seed)
    graphdef = self.graphdef
    z_all = jnp.asarray(layer_norm(feats.f_train))
    t_all = jnp.asarray(feats.t_train)

    def body(carry, inp):
      params, opt_state = carry
      idx, step = inp

      def loss_fn(p):
        return gendd.diffusion_loss(
            nnx.merge(graphdef, p), schedule, jax.random.fold_in(key, step),
            z_all[idx], t_all[idx], loss_settings)[0]

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(params, opt_state, idx, steps):
      return jax.lax.scan(body, (params, opt_state), (idx, steps))

    self._run = run
    self._samplers = {}

  def train(self, num_steps: int) -> None:
    """`num_steps` more steps, `chunk` per dispatch."""
    end = self.step + num_steps
    while self.step < end:
      count = min(self.chunk, end - self.step)
      idx = batch_indices(len(self.feats.t_train), self.setup.batch_size,
                          self.seed, self.step, count)
      (self.params, self.opt_state), losses = self._run(
          self.params, self.opt_state, jnp.asarray(idx),
          jnp.arange(self.step, self.step + count, dtype=jnp.int32))
      self.losses.extend(np.asarray(losses).tolist())
      self.step += count

  def _sampler(self, clip: bool):
    if clip not in self._samplers:
      s = self.setup
      settings = gendd.SampleSettings(
          token_dim=s.token_dim, num_sampling=1, cfg_scale=s.cfg_scale,
          temperature=s.temperature,
          clip_x0=jnp.float32(self.feats.clip_bound) if clip else None,
          sampler='ancestral')
      schedule = gendd.sampling_schedule(s.noise_schedule, s.diffusion_steps,
                                         s.sampling_steps, 'ancestral')
      graphdef = self.graphdef

      @jax.jit
      def run(params, z, w, b, key):
        return gendd.sampled_logits(nnx.merge(graphdef, params), schedule,
                                    key, z, settings, w, b)[1]
      self._samplers[clip] = run
    return self._samplers[clip]

  def sample(self, clip: bool) -> np.ndarray:
    """Sampled teacher-space features `[N_test, D]` (paper's sampler, or
    with the x0 estimate clipped to the targets' range)."""
    # The same key for both variants: they start from the same noise.
    key = jax.random.fold_in(jax.random.key(self.seed), 1 << 30)
    return np.asarray(self._sampler(clip)(
        self.params, jnp.asarray(layer_norm(self.feats.f_test)),
        jnp.asarray(self.feats.weight), jnp.asarray(self.feats.bias), key))

  def eps_fn(self) -> EpsFn:
    graphdef, c = self.graphdef, self.setup.token_dim

    @jax.jit
    def fwd(params, x, t, z, token):
      return nnx.merge(graphdef, params)(x, t, z, token)[:, :c]

    def fn(x, t, f, token, null):
      z = layer_norm(f)
      if null:
        z = np.zeros_like(z)
      return np.asarray(fwd(self.params, jnp.asarray(x),
                            jnp.full(x.shape[:1], t, jnp.int32),
                            jnp.asarray(z), jnp.asarray(token, jnp.int32)))
    return fn


# ---------------------------------------------------------------------------
# Theirs.
# ---------------------------------------------------------------------------


class Theirs:
  """The authors' `DiffModel` (their `DiffLoss` inside) over a pass-through
  backbone: the rows given are the student features; their frozen
  `cls_projector` is the condition LayerNorm; only `diffloss` trains."""

  name = 'theirs'

  def __init__(self, ref, feats: Features, setup: HeadSetup, seed: int):
    self.ref, self.feats, self.setup, self.seed = ref, feats, setup, seed
    torch = ref.torch
    nn = torch.nn
    dz, d = feats.f_train.shape[1], feats.t_train.shape[1]
    num_classes = feats.weight.shape[0]

    class PassThrough(nn.Module):
      """Backbone stand-in: the input rows are the features."""

      def __init__(self):
        super().__init__()
        self.fc = nn.Linear(dz, num_classes)  # Their probe (not trained).

      def forward(self, x, is_feat=False, preact=False):
        del preact
        logits = self.fc(x)
        return ([x], logits) if is_feat else logits

    class Recording(nn.Linear):
      """The teacher classifier, keeping the features it classified."""

      def forward(self, x):
        self.last_input = x.detach()
        return super().forward(x)

    torch.manual_seed(seed)
    classifier = Recording(d, num_classes)
    with torch.no_grad():
      classifier.weight.copy_(torch.from_numpy(np.array(feats.weight)))
      classifier.bias.copy_(torch.from_numpy(np.array(feats.bias)))
    self.model = ref.DiffModel(
        PassThrough(), classifier=classifier, feature_dim=dz, target_dim=d,
        smooth=0.0, num_sampling=1, beta=0.0, diffloss_d=setup.depth,
        diffloss_w=setup.width, num_sampling_steps=setup.sampling_steps,
        diffusion_batch_mul=setup.diffusion_batch_mul,
        token_dim=setup.token_dim, cond_drop_prob=setup.cond_drop_prob)
    for p in self.model.parameters():
      p.requires_grad_(False)
    for p in self.model.diffloss.parameters():
      p.requires_grad_(True)
    if not setup.use_vb:
      raise ValueError('the reference always trains the VB term')
    # Their optimiser grouping gives `diffloss` no weight decay.
    self.opt = torch.optim.AdamW(self.model.diffloss.parameters(),
                                 lr=setup.lr, betas=(0.9, setup.beta2_min),
                                 weight_decay=0.0)
    spec = setup.optim_spec()
    self._lr = jax.jit(jax.vmap(optim.learning_rate(spec)))
    self._b2 = jax.jit(jax.vmap(optim.beta2(spec)))
    self.step = 0
    self.losses: list[float] = []

  def train(self, num_steps: int, chunk: int = 500) -> None:
    """`num_steps` more steps of their stage-2 iteration (diffusion loss
    only), with our schedules' lr and beta2 set before each step."""
    torch, s = self.ref.torch, self.setup
    f = torch.from_numpy(self.feats.f_train)
    t = torch.from_numpy(self.feats.t_train)
    self.model.train()
    end = self.step + num_steps
    while self.step < end:
      count = min(chunk, end - self.step)
      steps = jnp.arange(self.step, self.step + count)
      lrs = np.asarray(self._lr(steps), np.float64)
      b2s = np.asarray(self._b2(steps), np.float64)
      idx = torch.from_numpy(batch_indices(
          len(self.feats.t_train), s.batch_size, self.seed, self.step,
          count).astype(np.int64))
      for j in range(count):
        for group in self.opt.param_groups:
          group['lr'] = float(lrs[j])
          group['betas'] = (0.9, float(b2s[j]))
        loss, _ = self.model(f[idx[j]], y=None, target_feature=t[idx[j]])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))
      self.step += count

  def sample(self, clip: bool) -> np.ndarray:
    """Their `forward_test_stage2` on the test rows; with `clip`, their
    `p_sample_loop` gets a `denoised_fn` clamping the x0 estimate.

    Seeds torch's global generator, which their training also draws from:
    a run's later snapshots depend on which earlier ones were sampled.
    """
    torch = self.ref.torch
    gen = self.model.diffloss.gen_diffusion
    bound = self.feats.clip_bound
    self.model.eval()
    torch.manual_seed(self.seed + (1 << 30))  # Same noise for both variants.
    with torch.no_grad(), bench_reference.cpu_cuda(torch):
      if clip:
        loop = gen.p_sample_loop
        gen.p_sample_loop = lambda *a, **k: loop(
            *a, denoised_fn=lambda x: x.clamp(-bound, bound), **k)
      try:
        self.model(torch.from_numpy(self.feats.f_test))
      finally:
        if clip:
          del gen.p_sample_loop  # Back to the class's method.
    return self.model.classifier.last_input.numpy()

  def eps_fn(self) -> EpsFn:
    torch = self.ref.torch
    net = self.model.diffloss.net

    def fn(x, t, f, token, null):
      self.model.eval()
      with torch.no_grad():
        z = self.model.cls_projector(torch.from_numpy(f))
        if null:
          z = torch.zeros_like(z)
        out = net(torch.from_numpy(x), torch.full((x.shape[0],), t,
                                                  dtype=torch.long),
                  z, torch.from_numpy(token))
      return out[:, :self.setup.token_dim].numpy()
    return fn


# ---------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------


def evaluate(impl, feats: Features, probe: EpsProbe, setup: HeadSetup
             ) -> dict[str, Any]:
  """The sampled-feature metrics and the epsilon errors of a trained head."""
  paper = sample_metrics(impl.sample(clip=False), feats)
  clipped = sample_metrics(impl.sample(clip=True), feats)
  return dict(paper=paper, clipped=clipped,
              eps_error=eps_errors(impl.eps_fn(), probe, setup.cfg_scale))


def run_seed(kind: str, feats: Features, setup: HeadSetup, probe: EpsProbe,
             snapshots: list[int], seed: int, ref=None,
             log: Callable[[str], None] = print,
             on_snapshot: Callable[[dict[str, Any]], None] | None = None
             ) -> list[dict[str, Any]]:
  """One run of `max(snapshots)` steps, evaluated at every snapshot;
  `on_snapshot` gets each snapshot's row as soon as it is measured."""
  impl = (Ours(feats, setup, seed) if kind == 'ours'
          else Theirs(ref, feats, setup, seed))
  out, train_seconds = [], 0.0
  for num_steps in sorted(snapshots):
    t0 = time.time()
    impl.train(num_steps - impl.step)
    train_seconds += time.time() - t0
    t1 = time.time()
    res = evaluate(impl, feats, probe, setup)
    tail = impl.losses[-min(len(impl.losses), 200):]
    r = dict(implementation=kind, seed=seed, steps=num_steps,
             train_seconds=train_seconds, eval_seconds=time.time() - t1,
             final_loss=float(np.mean(tail)) if tail else float('nan'),
             **res)
    t = str(probe.timesteps[0])
    log(f"{kind:6s} seed {seed} {num_steps:6d} steps: paper "
        f"{r['paper']['top1']:.2f}% (norm x"
        f"{r['paper']['norm_ratio_median']:.3g}), clipped "
        f"{r['clipped']['top1']:.2f}%, eps err t={t} cond/guided "
        f"{r['eps_error'][t]['cond']:.3g}/{r['eps_error'][t]['guided']:.3g}, "
        f"loss {r['final_loss']:.4f}, train {train_seconds:.0f} s, eval "
        f"{r['eval_seconds']:.0f} s")
    out.append(r)
    if on_snapshot is not None:
      on_snapshot(r)
  return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and spread over seeds per (implementation, steps)."""
  groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for r in runs:
    groups.setdefault((r['implementation'], r['steps']), []).append(r)
  rows = []
  for (kind, steps), rs in sorted(groups.items(),
                                  key=lambda kv: (kv[0][1], kv[0][0])):
    def stat(get):
      v = np.asarray([get(r) for r in rs], np.float64)
      return dict(mean=float(v.mean()), min=float(v.min()),
                  max=float(v.max()), values=v.tolist())
    row = dict(implementation=kind, steps=steps,
               seeds=[r['seed'] for r in rs],
               paper_top1=stat(lambda r: r['paper']['top1']),
               paper_norm_ratio=stat(
                   lambda r: r['paper']['norm_ratio_median']),
               clipped_top1=stat(lambda r: r['clipped']['top1']),
               clipped_norm_ratio=stat(
                   lambda r: r['clipped']['norm_ratio_median']),
               final_loss=stat(lambda r: r['final_loss']),
               eps_error={t: {k: stat(lambda r, t=t, k=k:
                                      r['eps_error'][t][k])['mean']
                              for k in ('cond', 'uncond', 'guided')}
                          for t in rs[0]['eps_error']})
    rows.append(row)
  return rows


def run_experiment(feats: Features, setup: HeadSetup, steps: list[int],
                   seeds: list[int], implementations: list[str], ref=None,
                   eps_timesteps=(999, 990, 950, 500, 100), eps_draws: int = 4,
                   long_seeds: int = 0, long_steps: int = 16000,
                   log: Callable[[str], None] = print,
                   on_progress: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
  """Every (implementation, seed, length) run; the JSON record.

  `on_progress` gets the record of the snapshots measured so far after each
  one (a long run stopped early keeps what it measured).
  """
  for kind in implementations:
    if kind not in IMPLEMENTATIONS:
      raise ValueError(f'unknown implementation {kind!r}; expected one of '
                       f'{IMPLEMENTATIONS}')
  if 'theirs' in implementations and ref is None:
    raise ValueError("'theirs' needs the reference code")
  probe = eps_probe(feats, setup, eps_timesteps, eps_draws)
  runs, measured = [], []

  def snapshot(row):
    measured.append(row)
    if on_progress is not None:
      on_progress(_record(feats, setup, probe, eps_draws, list(measured)))

  for i, seed in enumerate(seeds):
    snapshots = sorted(steps)
    if long_seeds > 0 and i >= long_seeds:
      snapshots = [n for n in snapshots if n <= long_steps]
    for kind in implementations:
      runs += run_seed(kind, feats, setup, probe, snapshots, seed, ref, log,
                       on_snapshot=snapshot)
  return _record(feats, setup, probe, eps_draws, runs)


def _record(feats: Features, setup: HeadSetup, probe: EpsProbe,
            eps_draws: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
  teacher_top1 = float(100.0 * np.mean(
      (feats.t_test @ feats.weight.T + feats.bias).argmax(-1) ==
      feats.y_test))
  return dict(
      setup=dataclasses.asdict(setup),
      data=dict(train_rows=int(len(feats.t_train)),
                test_rows=int(len(feats.t_test)),
                student_dim=int(feats.f_train.shape[1]),
                teacher_dim=int(feats.t_train.shape[1]),
                clip_bound=feats.clip_bound, teacher_top1=teacher_top1,
                teacher_norm_mean=float(np.linalg.norm(
                    feats.t_test, axis=-1).mean())),
      eps_probe=dict(timesteps=[int(t) for t in probe.timesteps],
                     rows=int(probe.x0.shape[0]), draws=eps_draws,
                     alphas_cumprod=probe.alphas_cumprod.tolist()),
      runs=runs, summary=summarise(runs))


# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------


def _fmt_stat(s: dict[str, float], fmt: str) -> str:
  if len(s['values']) == 1:
    return format(s['mean'], fmt)
  return (f"{format(s['mean'], fmt)} ({format(s['min'], fmt)}–"
          f"{format(s['max'], fmt)})")


def markdown(record: dict[str, Any], conclusion: str = '') -> str:
  """The results as Markdown tables (plus `conclusion`)."""
  m = record['meta'] if 'meta' in record else {}
  lines = ['# Twin experiment: the paper\'s sampler in our port and in the '
           'authors\' code', '']
  if m:
    wall = (f"Wall time: {m['wall_seconds'] / 60:.1f} min on "
            f"{m['machine']}")
    notes = []
    if m.get('merged'):
      notes.append(f"the longest of {m['merged']} records merged with "
                   '--merge')
    if m.get('paused_seconds'):
      notes.append(f"including {m['paused_seconds'] / 60:.1f} min paused "
                   'while the machine was timed for something else')
    if notes:
      wall += ' (' + ', '.join(notes) + ')'
    lines += [f"Command: `{m['command']}`", '', wall + '.', '']
  d, s = record['data'], record['setup']
  lines += [
      f"Data: digits fold {m.get('fold', 0)}, data seed "
      f"{m.get('data_seed', 0)}: {d['train_rows']} training and "
      f"{d['test_rows']} test rows; condition = LayerNorm(stage-1 student "
      f"feature, {d['student_dim']}-d), target = teacher feature "
      f"({d['teacher_dim']}-d, {d['teacher_dim'] // s['token_dim']} tokens of "
      f"{s['token_dim']}); teacher top-1 on the test rows "
      f"{d['teacher_top1']:.2f}%, clip bound {d['clip_bound']:.3f}.", '',
      f"Head: width {s['width']}, depth {s['depth']}, diffusion_batch_mul "
      f"{s['diffusion_batch_mul']}, cond-drop {s['cond_drop_prob']}, "
      f"learned variance + VB, {s['noise_schedule']} schedule of "
      f"{s['diffusion_steps']} steps; AdamW lr {s['lr']} after "
      f"{s['warmup_steps']} warm-up steps, then constant (no decay: each "
      "row is a snapshot of one run per seed), beta2 "
      f"{s['beta2_min']}→{s['beta2_max']} over the first "
      f"{s['beta2_steps']} steps, no weight decay, batch "
      f"{s['batch_size']} images. Sampler: ancestral, "
      f"{s['sampling_steps']} respaced steps, CFG {s['cfg_scale']}, "
      f"temperature {s['temperature']}, one draw.", '',
      'Each cell: mean over head seeds (min–max). Norm ratio: median over '
      'test images of ‖sample‖ / ‖teacher feature‖.', '',
      '| steps | implementation | seeds | paper sampler top-1 % | norm ratio '
      '| x0-clipped top-1 % | clipped norm ratio | final loss |',
      '|---|---|---|---|---|---|---|---|']
  for r in record['summary']:
    lines.append(
        f"| {r['steps']} | {r['implementation']} | "
        f"{','.join(str(x) for x in r['seeds'])} | "
        f"{_fmt_stat(r['paper_top1'], '.2f')} | "
        f"{_fmt_stat(r['paper_norm_ratio'], '.3g')} | "
        f"{_fmt_stat(r['clipped_top1'], '.2f')} | "
        f"{_fmt_stat(r['clipped_norm_ratio'], '.3g')} | "
        f"{_fmt_stat(r['final_loss'], '.4f')} |")
  ts = record['eps_probe']['timesteps']
  ac = record['eps_probe']['alphas_cumprod']
  lines += ['', 'Epsilon-prediction error E‖ε̂ − ε‖² per dimension on '
            f"{record['eps_probe']['rows']} held-out token rows (identical "
            'x_t for both), mean over seeds: conditional / guided (scale '
            f"{s['cfg_scale']}). The x0 estimate's squared error is the ε "
            'error times (1 − ᾱ)/ᾱ: ' + ', '.join(
                f't={t}: {(1 - a) / a:.3g}' for t, a in zip(ts, ac)) + '.',
            '', '| steps | implementation | ' + ' | '.join(
                f't={t}' for t in ts) + ' |',
            '|---|---|' + '---|' * len(ts)]
  for r in record['summary']:
    cells = [f"{r['eps_error'][str(t)]['cond']:.3g} / "
             f"{r['eps_error'][str(t)]['guided']:.3g}" for t in ts]
    lines.append(f"| {r['steps']} | {r['implementation']} | " +
                 ' | '.join(cells) + ' |')
  t0 = str(ts[0])
  lines += ['', f'Mechanism check: the norm an x0 estimate at t={t0} carries '
            'from the guided ε error alone, √(D · E_guided · (1 − ᾱ)/ᾱ), '
            'over the mean teacher-feature norm, beside the measured sample '
            'norm ratio (paper sampler).', '',
            '| steps | implementation | predicted from ε error | measured '
            '| measured / predicted |', '|---|---|---|---|---|']
  for r in record['summary']:
    pred = predicted_norm_ratio(record, r['eps_error'][t0]['guided'])
    got = r['paper_norm_ratio']['mean']
    lines.append(f"| {r['steps']} | {r['implementation']} | {pred:.3g} | "
                 f'{got:.3g} | {got / pred:.2f} |')
  if conclusion:
    lines += ['', '## Conclusion', '', conclusion]
  return '\n'.join(lines) + '\n'


def predicted_norm_ratio(record: dict[str, Any], guided_error: float
                         ) -> float:
  """The norm of the x0 estimate's error at the first probe timestep (the
  sampler's first step) implied by a guided epsilon error, over the mean
  teacher-feature norm: `sqrt(D * err * (1 - abar) / abar) / |t|`."""
  ab = record['eps_probe']['alphas_cumprod'][0]
  d = record['data']
  return float(np.sqrt(d['teacher_dim'] * guided_error * (1.0 - ab) / ab) /
               d['teacher_norm_mean'])


def plot(record: dict[str, Any], path: str) -> None:
  """Accuracy, norm ratio and epsilon errors against training length."""
  # matplotlib only when a plot is written (the tests write none).
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  colors = {'ours': 'tab:blue', 'theirs': 'tab:orange'}
  rows = record['summary']
  ts = record['eps_probe']['timesteps']
  for kind in IMPLEMENTATIONS:
    rs = [r for r in rows if r['implementation'] == kind]
    if not rs:
      continue
    x = [r['steps'] for r in rs]
    c = colors[kind]
    ax = axes[0, 0]
    ax.plot(x, [r['paper_top1']['mean'] for r in rs], 'o-', color=c,
            label=f'{kind}: paper sampler')
    ax.plot(x, [r['clipped_top1']['mean'] for r in rs], 's--', color=c,
            label=f'{kind}: x0 clipped')
    for r in rs:
      ax.plot([r['steps']] * len(r['paper_top1']['values']),
              r['paper_top1']['values'], '.', color=c, alpha=0.4)
    ax = axes[0, 1]
    ax.plot(x, [r['paper_norm_ratio']['mean'] for r in rs], 'o-', color=c,
            label=f'{kind}: paper sampler')
    ax.plot(x, [r['clipped_norm_ratio']['mean'] for r in rs], 's--',
            color=c, label=f'{kind}: x0 clipped')
    ax.plot(x, [predicted_norm_ratio(
        record, r['eps_error'][str(ts[0])]['guided']) for r in rs], 'x:',
            color=c, label=f'{kind}: from the ε error at t={ts[0]}')
    ax = axes[1, 0]
    for t, style in zip(ts[:3], ('o-', 's--', '^:')):
      ax.plot(x, [r['eps_error'][str(t)]['guided'] for r in rs], style,
              color=c, label=f'{kind}: guided, t={t}')
    ax = axes[1, 1]
    last = rs[-1]
    ax.plot(ts, [last['eps_error'][str(t)]['cond'] for t in ts], 'o-',
            color=c, label=f"{kind}: conditional ({last['steps']} steps)")
    ax.plot(ts, [last['eps_error'][str(t)]['guided'] for t in ts], 's--',
            color=c, label=f"{kind}: guided ({last['steps']} steps)")
  axes[0, 0].set(xscale='log', xlabel='head training steps',
                 ylabel='top-1 % (teacher classifier)',
                 title='Accuracy of sampled features')
  axes[0, 1].set(xscale='log', yscale='log', xlabel='head training steps',
                 ylabel='median ‖sample‖ / ‖teacher feature‖',
                 title='Sample norm')
  axes[0, 1].axhline(1.0, color='grey', lw=0.5)
  axes[1, 0].set(xscale='log', yscale='log', xlabel='head training steps',
                 ylabel='E‖ε̂ − ε‖² per dim', title='Guided ε error, '
                 'noisiest steps')
  axes[1, 1].set(yscale='log', xlabel='timestep t',
                 ylabel='E‖ε̂ − ε‖² per dim',
                 title='ε error against t, longest run')
  for ax in axes.ravel():
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(record: dict[str, Any], prefix: str,
                  conclusion: str = '') -> list[str]:
  """`<prefix>.json`, `.md` (keeping an existing conclusion unless one is
  given) and `.png`; returns the paths."""
  directory = os.path.dirname(prefix)
  if directory:
    os.makedirs(directory, exist_ok=True)
  md_path = prefix + '.md'
  if not conclusion and os.path.exists(md_path):
    with open(md_path) as f:
      text = f.read()
    if '## Conclusion' in text:
      conclusion = text.split('## Conclusion', 1)[1].strip()
  with open(prefix + '.json', 'w') as f:
    json.dump(record, f, indent=1)
  with open(md_path, 'w') as f:
    f.write(markdown(record, conclusion))
  plot(record, prefix + '.png')
  return [prefix + '.json', md_path, prefix + '.png']


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
  """One record of several runs of this script on the same data and setup
  (e.g. `--implementations=ours` and `=theirs` run side by side, one core
  each): their runs together, summarised again. Refuses records whose data,
  setup or probe differ, or that both hold the same run."""
  if not records:
    raise ValueError('nothing to merge')
  first = records[0]
  runs, seen = [], set()
  for i, r in enumerate(records):
    for key in ('setup', 'data', 'eps_probe'):
      if r[key] != first[key]:
        raise ValueError(f'record {i} has another {key!r} than record 0: '
                         'merge only runs on the same data and setup')
    for run in r['runs']:
      key = (run['implementation'], run['seed'], run['steps'])
      if key in seen:
        raise ValueError(f'run {key} is in more than one record')
      seen.add(key)
      runs.append(run)
  out = {k: first[k] for k in ('setup', 'data', 'eps_probe')}
  out.update(runs=runs, summary=summarise(runs))
  metas = [r['meta'] for r in records if 'meta' in r]
  if metas:
    out['meta'] = dict(
        metas[0], command=' ; '.join(m['command'] for m in metas),
        wall_seconds=max(m['wall_seconds'] for m in metas),
        merged=len(records),
        paused_seconds=max(m.get('paused_seconds', 0.0) for m in metas))
  return out


def _define_flags() -> None:
  """The command's flags, defined only when it runs as a program: the
  tests import this module beside the package's commands, whose flags
  (--config, --workdir, --steps) share names with these."""
  global _CONFIG, _REFERENCE_DIR, _OUTPUT_PREFIX, _WORKDIR, _STEPS, _SEEDS
  global _LONG_SEEDS, _LONG_STEPS, _IMPLEMENTATIONS, _DATA_SEED, _FOLD
  global _EPS_TIMESTEPS, _EPS_DRAWS, _TORCH_THREADS, _MERGE
  _CONFIG = config_flags.DEFINE_config_file(
      'config', 'configs/digits.py', 'The bundled example config whose '
      'teacher, stage-1 and gendd-stage settings are used.',
      lock_config=True)
  _REFERENCE_DIR = flags.DEFINE_string(
      'reference_dir', None, "Local copy of the authors' code (GenDD_cifar/ or "
      'its parent).')
  _OUTPUT_PREFIX = flags.DEFINE_string(
      'output_prefix', 'docs/results/twin_sampler',
      'Writes <prefix>.json, <prefix>.md and <prefix>.png.')
  _WORKDIR = flags.DEFINE_string(
      'workdir', '', 'Where the teacher and stage-1 runs go (reused when '
      'present); default: a temporary directory.')
  _STEPS = flags.DEFINE_list(
      'steps', ['1000', '4000', '16000', '64000'],
      'Training lengths (head steps): snapshots of one run per seed and '
      'implementation.')
  _SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Head seeds.')
  _LONG_SEEDS = flags.DEFINE_integer(
      'long_seeds', 0, 'If > 0, only the first this many seeds go past '
      '--long_steps (to fit a time budget).')
  _LONG_STEPS = flags.DEFINE_integer('long_steps', 16000, 'See --long_seeds.')
  _IMPLEMENTATIONS = flags.DEFINE_list(
      'implementations', ['ours', 'theirs'], "'ours' and/or 'theirs'.")
  _DATA_SEED = flags.DEFINE_integer('data_seed', 0, 'Seed of the teacher, '
                                    'stage-1 runs and the fold assignment.')
  _FOLD = flags.DEFINE_integer('fold', 0, 'Fold of the digits protocol.')
  _EPS_TIMESTEPS = flags.DEFINE_list(
      'eps_timesteps', ['999', '990', '950', '500', '100'],
      'Timesteps of the epsilon-error measurement.')
  _EPS_DRAWS = flags.DEFINE_integer(
      'eps_draws', 4, 'Noise draws per held-out token row in the epsilon-error '
      'measurement.')
  _TORCH_THREADS = flags.DEFINE_integer('torch_threads', 1,
                                        'Intra-op threads for torch.')
  _MERGE = flags.DEFINE_list(
      'merge', [], 'Instead of running: merge these JSON records of earlier '
      'runs (same data and setup, e.g. one per --implementations) into '
      '<output_prefix>.json/.md/.png.')


def main(argv):
  del argv
  if _MERGE.value:
    records = []
    for path in _MERGE.value:
      with open(path) as f:
        records.append(json.load(f))
    try:
      record = merge_records(records)
    except ValueError as e:
      sys.exit(f'twin_sampler: cannot merge: {e}')
    for path in write_outputs(record, _OUTPUT_PREFIX.value):
      print('wrote', path)
    return
  implementations = list(_IMPLEMENTATIONS.value)
  ref = None
  if 'theirs' in implementations:
    if not _REFERENCE_DIR.value:
      sys.exit("twin_sampler: --reference_dir is required (a local copy of "
               "the authors' code, e.g. /tmp/gendd_ref/GenDD_cifar); "
               "--implementations=ours runs our side alone")
    try:
      ref = bench_reference.load(_REFERENCE_DIR.value)
    except (FileNotFoundError, ImportError) as e:
      sys.exit(f"twin_sampler: cannot use the authors' code at "
               f'{_REFERENCE_DIR.value!r}: {e}')
    ref.torch.set_num_threads(_TORCH_THREADS.value)
  config = _CONFIG.value
  t0 = time.time()
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='twin_sampler_')
  feats = prepare_features(config, workdir, _DATA_SEED.value, _FOLD.value)
  setup = head_setup(config, len(feats.t_train))
  # The snapshots measured so far, rewritten after each one: a run stopped
  # early keeps them (`--merge` accepts this file).
  partial_path = _OUTPUT_PREFIX.value + '.partial.json'

  def meta(in_progress=False):
    return dict(
        command='python -m experiments.twin_sampler ' + ' '.join(
            a for a in sys.argv[1:]),
        wall_seconds=time.time() - t0, fold=_FOLD.value,
        data_seed=_DATA_SEED.value,
        machine=f'{platform.machine()}, {os.cpu_count()} CPUs',
        jax=jax.__version__,
        torch=ref.torch.__version__ if ref is not None else None,
        torch_threads=_TORCH_THREADS.value if ref is not None else None,
        **({'partial': 'the snapshots measured so far'}
           if in_progress else {}))

  def progress(rec):
    rec['meta'] = meta(in_progress=True)
    with open(partial_path + '.tmp', 'w') as f:
      json.dump(rec, f, indent=1)
    os.replace(partial_path + '.tmp', partial_path)

  record = run_experiment(
      feats, setup, [int(s) for s in _STEPS.value],
      [int(s) for s in _SEEDS.value], implementations, ref,
      eps_timesteps=tuple(int(t) for t in _EPS_TIMESTEPS.value),
      eps_draws=_EPS_DRAWS.value, long_seeds=_LONG_SEEDS.value,
      long_steps=_LONG_STEPS.value, on_progress=progress)
  record['meta'] = meta()
  for path in write_outputs(record, _OUTPUT_PREFIX.value):
    print('wrote', path)
  if os.path.exists(partial_path):
    os.remove(partial_path)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
