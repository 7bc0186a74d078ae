r"""Records the released code's training steps for `tests/test_step_parity.py`.

Runs the authors' PyTorch code (a local copy of their repository, given by
`--reference_dir`; nothing of it is stored in this project) for three
optimizer steps of four training stages, on CPU in float32:

  gendd   CIFAR stage-2 (`train_student_gendd.py`: its parameter groups, lr
          schedule and the `helper/loops.py` step with the beta2 ramp);
  stage1  CIFAR stage-1 (`train_student_pretrain.py`);
  kd      Hinton KD (the repository's `DistillKL` + cross-entropy, torch
          SGD, the CIFAR step schedule of `helper/util.py`);
  kl      unsupervised KL (`main_unsupervised_kd.py`: its step and schedule).

Each stage's hyperparameters are this project's recipe for it (the configs
named in `CASES`, which `docs/recipes.md` ties to the released scripts),
with small networks (ResNet-8 student, ResNet-14 teacher), a small head,
batches of 8 and one step per epoch so that three steps cross the lr
schedule. Every random draw of the reference step (permutation, Beta
lambda, condition-dropout mask, timesteps, noise) is recorded as it is
drawn. The fixture holds the initial weights, the inputs, the draws, and
per step the loss, lr and beta2, then the final weights and BatchNorm
statistics: numbers only.

  python -m tools.step_parity --reference_dir=/path/to/their/repository
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from typing import Any

from absl import app
from absl import flags
import numpy as np

BATCH = 8
STEPS = 3
NUM_CLASSES = 100
# Shared by every case; the released code computes in float32 (the ImageNet
# configs' bfloat16 is one of the kept differences, `docs/recipes.md`).
MODELS = {'student.model': 'resnet8', 'teacher.model': 'resnet14',
          'data.batch_size': BATCH, 'precision.student': 'float32',
          'precision.teacher': 'float32', 'precision.head': 'float32'}
# Stage -> (config file, argument, overrides). One step per epoch: the
# schedules are shortened so that three steps see them change.
CASES = {
    'gendd': ('configs/cifar100_gendd.py', '', {
        'gendd.token_dim': 16, 'gendd.width': 32,
        'gendd.diffusion_batch_mul': 2, 'stages.gendd.epochs': 4.0,
        'stages.gendd.warmup_epochs': 2.0,
        'stages.gendd.decay_epochs': (2.0, 3.0),
        'stages.gendd.lr_update': 'epoch'}),
    'stage1': ('configs/cifar100_gendd.py', '', {
        'stages.stage1.epochs': 4.0, 'stages.stage1.lr_update': 'epoch'}),
    'kd': ('configs/cifar100_gendd.py', '', {
        'stages.kd.epochs': 4.0, 'stages.kd.decay_epochs': (2.0, 3.0),
        'stages.kd.lr_update': 'epoch'}),
    'kl': ('configs/cc3m_unsup.py', 'r18', {
        'stages.kl.epochs': 12.0, 'stages.kl.lr_update': 'epoch'}),
}


def case_config(name: str, root: str = '.', shorten: bool = True):
  """The project config of case `name` (its file, argument, overrides;
  `shorten=False`: the recipe's own schedule, per epoch)."""
  path, arg, overrides = CASES[name]
  if not shorten:
    overrides = {f'stages.{name}.lr_update': 'epoch'}
  spec = importlib.util.spec_from_file_location(
      'config_' + name, os.path.join(root, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for key, value in {**MODELS, **overrides}.items():
    *parents, leaf = key.split('.')
    block = config
    for p in parents:
      block = block[p]
    block[leaf] = value
  config.stage = name
  return config


# ---------------------------------------------------------------------------
# Importing the reference code.
# ---------------------------------------------------------------------------


class _Anything(types.ModuleType):
  """A stand-in for modules the reference entry points import at the top but
  the recorded steps never use (data loaders, loggers, other models)."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _Anything(name)

  def __call__(self, *args, **kwargs):
    return _Anything('call')


def _stub(*names):
  for n in names:
    sys.modules[n] = _Anything(n)


def _purge(prefixes):
  for n in list(sys.modules):
    if n.split('.')[0] in prefixes:
      del sys.modules[n]


_SHARED = ('models', 'diffloss', 'diffusion', 'helper', 'dataset',
           'distiller_zoo', 'utils', 'randaugment', 'train_student_gendd',
           'train_student_pretrain', 'main_unsupervised_kd')


def import_reference(root: str) -> dict[str, Any]:
  """The reference functions and classes the steps use."""
  imagenet = os.path.join(root, 'GenDD_imagenet')
  cifar = os.path.join(root, 'GenDD_cifar')
  for d in (imagenet, cifar):
    if not os.path.isdir(d):
      raise SystemExit(f'error: {d} does not exist; --reference_dir must be '
                       "the root of a copy of the authors' repository")
  ref = {}
  _purge(_SHARED)
  _stub('torchvision', 'torchvision.datasets', 'torchvision.transforms',
        'webdataset', 'models', 'models.diff_model', 'models.resnet',
        'models.mobilenetv1', 'models.beit')
  sys.path.insert(0, imagenet)
  try:
    import main_unsupervised_kd as kl  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(imagenet)
  ref['kl_train'] = kl.train
  ref['kl_lr'] = kl.adjust_learning_rate_cos
  _purge(_SHARED + ('torchvision', 'webdataset'))
  _stub('tensorboard_logger', 'torchvision', 'torchvision.datasets',
        'torchvision.transforms', 'dataset', 'dataset.cifar100')
  sys.path.insert(0, cifar)
  try:
    import train_student_gendd as s2  # pylint: disable=g-import-not-at-top
    import train_student_pretrain as s1  # pylint: disable=g-import-not-at-top
    from helper import util  # pylint: disable=g-import-not-at-top
    from models import model_dict  # pylint: disable=g-import-not-at-top
    from distiller_zoo import DistillKL  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(cifar)
  ref.update(
      param_groups=s2.param_groups_setup, gendd_lr=s2.adjust_learning_rate,
      train_distill=s2.train, stage1_lr=s1.adjust_learning_rate_cos,
      kd_lr=util.adjust_learning_rate, model_dict=model_dict,
      DistillKL=DistillKL)
  return ref


# ---------------------------------------------------------------------------
# Recording.
# ---------------------------------------------------------------------------


class DrawRecorder:
  """Records every random draw of the wrapped torch/numpy functions."""

  _TORCH = ('randperm', 'rand', 'randint', 'randn_like')

  def __init__(self):
    self.draws: list[tuple[str, np.ndarray]] = []

  def __enter__(self):
    import torch  # pylint: disable=g-import-not-at-top
    self._saved = {n: getattr(torch, n) for n in self._TORCH}
    self._beta = np.random.beta
    for n in self._TORCH:
      setattr(torch, n, self._wrap(n, self._saved[n]))
    np.random.beta = self._wrap('beta', self._beta)
    return self

  def __exit__(self, *exc):
    import torch  # pylint: disable=g-import-not-at-top
    for n, fn in self._saved.items():
      setattr(torch, n, fn)
    np.random.beta = self._beta

  def _wrap(self, name, fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      self.draws.append((name, np.array(out.detach().numpy()
                                         if hasattr(out, 'detach') else out)))
      return out
    return wrapped

  def take(self) -> list[tuple[str, np.ndarray]]:
    out, self.draws = self.draws, []
    return out


def _state(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()
          if not k.endswith('num_batches_tracked')}


def _load(module, arrays: dict[str, np.ndarray]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  module.load_state_dict({k: torch.tensor(v) for k, v in arrays.items()},
                         strict=False)


def _perturbed(state, rng, scale=0.05):
  """Every float tensor moved off its initialisation (zero-initialised
  layers would otherwise hide most of the head from the comparison)."""
  out = {}
  for k, v in state.items():
    if v.dtype.kind != 'f':
      out[k] = v
    elif k.endswith('running_var'):
      out[k] = (1.0 + 0.5 * rng.random(v.shape)).astype(np.float32)
    else:
      out[k] = (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
  return out


class _Opt(types.SimpleNamespace):
  """The argparse namespace the reference functions read."""


class _StepLog:
  """Wraps `optimizer.step` to record each step's lr and beta2."""

  def __init__(self, optimizer):
    self.lr, self.beta2 = [], []
    step = optimizer.step

    def logged(*args, **kwargs):
      g = optimizer.param_groups[0]
      self.lr.append(g['lr'])
      self.beta2.append(g['betas'][1] if 'betas' in g else 0.0)
      return step(*args, **kwargs)
    optimizer.step = logged


def _namespace(st) -> _Opt:
  """The reference's argparse names for a stage's settings."""
  return _Opt(learning_rate=st.lr, lr=st.lr, weight_decay=st.weight_decay,
              warmup_epochs=st.warmup_epochs, epochs=int(st.epochs),
              lr_decay_epochs=list(st.decay_epochs),
              lr_decay_rate=st.decay_rate, min_learning_rate=st.min_lr,
              min_lr=st.min_lr)


def released_schedule(ref: dict[str, Any], case: str, root: str = '.'
                      ) -> np.ndarray:
  """The lr of every epoch of the recipe's full schedule (none of `CASES`'
  shortening), from the reference's own lr function."""
  import torch  # pylint: disable=g-import-not-at-top
  full = case_config(case, root, shorten=False).stages[case]
  opt = _namespace(full)
  optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                              lr=full.lr)
  out = []
  for e in range(int(full.epochs)):
    if case == 'kl':  # Epochs counted from 0.
      ref['kl_lr'](e, optimizer, opt)
    else:
      fn = {'gendd': ref['gendd_lr'], 'stage1': ref['stage1_lr'],
            'kd': ref['kd_lr']}[case]
      fn(e + 1, opt, optimizer)
    out.append(optimizer.param_groups[0]['lr'])
  return np.asarray(out, np.float64)


def record(ref: dict[str, Any], root: str = '.') -> dict[str, np.ndarray]:
  """Runs the four cases; returns the fixture's arrays."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  md = ref['model_dict']
  teacher = md['resnet14'](num_classes=NUM_CLASSES)
  student = md['resnet8'](num_classes=NUM_CLASSES)
  init = {'teacher': _perturbed(_state(teacher), rng),
          'student': _perturbed(_state(student), rng)}
  images = rng.standard_normal((STEPS, BATCH, 3, 32, 32)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (STEPS, BATCH))
  out = {'images': images.transpose(0, 1, 3, 4, 2), 'labels': labels}
  for role in init:
    out.update({f'init/{role}/{k}': v for k, v in init[role].items()})
  meta = {}

  def fresh(role):
    net = md['resnet14' if role == 'teacher' else 'resnet8'](
        num_classes=NUM_CLASSES)
    _load(net, init[role])
    return net

  def loader(e):
    x = torch.tensor(images[e])
    y = torch.tensor(labels[e])
    return [(x, y, torch.arange(BATCH))]

  for case in CASES:
    cfg = case_config(case, root)
    st = cfg.stages[case]
    meta[case] = dict(config=CASES[case][0], arg=CASES[case][1],
                      overrides={**MODELS, **CASES[case][2]})
    model_t, model = fresh('teacher'), fresh('student')
    torch.manual_seed(1)
    np.random.seed(1)
    recorder = DrawRecorder()
    losses, draws = [], []
    if case in ('gendd', 'stage1'):
      g = cfg.gendd
      kwargs = dict(feature_dim=64, target_dim=64, stage='stage-1')
      if case == 'gendd':
        kwargs.update(stage='stage-2', smooth=g.smooth, beta=g.beta,
                      token_dim=g.token_dim, cond_drop_prob=g.cond_drop_prob,
                      diffloss_w=g.width, diffloss_d=g.depth,
                      diffusion_batch_mul=g.diffusion_batch_mul)
      model_s = md['DiffModel'](model=model, classifier=model_t.fc, **kwargs)
      if case == 'gendd':
        head = _perturbed(_state(model_s.diffloss.net), rng, 0.02)
        proj = _perturbed(_state(model_s.cls_projector), rng, 0.1)
        _load(model_s.diffloss.net, head)
        _load(model_s.cls_projector, proj)
        out.update({f'init/head/{k}': v for k, v in head.items()})
        out.update({f'init/cls_projector/{k}': v for k, v in proj.items()})
      trainable = nn.ModuleList([model_s])
      opt = _namespace(st)
      opt.diff_weight_decay = 0.0
      opt.adam_beta_min = st.beta2_min if case == 'gendd' else -1
      opt.adam_beta_max, opt.print_freq = st.beta2_max, 100
      if case == 'gendd':
        optimizer = torch.optim.AdamW(ref['param_groups'](trainable, opt),
                                      betas=(st.b1, st.beta2_min),
                                      lr=st.lr)
        schedule = ref['gendd_lr']
      else:
        optimizer = torch.optim.AdamW(trainable.parameters(), lr=st.lr,
                                      betas=(st.b1, st.beta2_max),
                                      weight_decay=st.weight_decay)
        schedule = ref['stage1_lr']
      log = _StepLog(optimizer)
      modules = nn.ModuleList([model_s, model_t])
      criteria = nn.ModuleList([nn.CrossEntropyLoss()])
      for epoch in range(1, STEPS + 1):
        schedule(epoch, opt, optimizer)
        with recorder:
          _, loss = ref['train_distill'](epoch, loader(epoch - 1), modules,
                                         criteria, optimizer, opt)
        losses.append(float(loss))
        draws.append(recorder.take())
      finals = {'student': _state(model)}
      if case == 'gendd':
        finals['head'] = _state(model_s.diffloss.net)
        finals['cls_projector'] = _state(model_s.cls_projector)
    elif case == 'kd':
      criterion_kd = ref['DistillKL'](cfg.kd.temperature)
      criterion_ce = nn.CrossEntropyLoss()
      optimizer = torch.optim.SGD(model.parameters(), lr=st.lr,
                                  momentum=st.b1,
                                  weight_decay=st.weight_decay)
      opt = _namespace(st)
      log = _StepLog(optimizer)
      model_t.eval()
      for epoch in range(1, STEPS + 1):
        ref['kd_lr'](epoch, opt, optimizer)
        model.train()
        (x, y, _), = loader(epoch - 1)
        with torch.no_grad():
          logit_t = model_t(x)
        logit_s = model(x)
        loss = (cfg.kd.ce_weight * criterion_ce(logit_s, y)
                + cfg.kd.kd_weight * criterion_kd(logit_s, logit_t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        draws.append([])
      finals = {'student': _state(model)}
    else:  # kl
      for p in model.fc.parameters():
        p.requires_grad = False
      optimizer = torch.optim.SGD(model.parameters(), st.lr, momentum=st.b1,
                                  weight_decay=st.weight_decay)
      args = _namespace(st)
      args.T = args.print_freq = 10 ** 9
      log = _StepLog(optimizer)
      seen = []

      class KLDiv(nn.KLDivLoss):
        def forward(self, inp, target):
          value = super().forward(inp, target)
          seen.append(float(value.sum(dim=-1).mean()))
          return value

      model_t.eval()
      for epoch in range(STEPS):  # The released loop counts from 0.
        ref['kl_lr'](epoch, optimizer, args)
        ref['kl_train']([(x, y) for x, y, _ in loader(epoch)], model,
                        model_t, nn.CrossEntropyLoss(),
                        KLDiv(reduction='none'), optimizer, epoch, 'cpu',
                        args)
        losses.append(seen[-1])
        draws.append([])
      finals = {'student': _state(model)}
    out[f'{case}/schedule'] = released_schedule(ref, case, root)
    out[f'{case}/loss'] = np.asarray(losses, np.float64)
    out[f'{case}/lr'] = np.asarray(log.lr, np.float64)
    out[f'{case}/beta2'] = np.asarray(log.beta2, np.float64)
    for role, state in finals.items():
      out.update({f'{case}/final/{role}/{k}': v for k, v in state.items()})
    for i, step in enumerate(draws):
      if case == 'gendd':
        (_, perm), (_, lam), (_, u), (_, t), (_, noise) = step
        out[f'{case}/draws/{i}/perm'] = perm
        out[f'{case}/draws/{i}/lam'] = np.asarray(lam, np.float64)
        out[f'{case}/draws/{i}/drop'] = u < cfg.gendd.cond_drop_prob
        out[f'{case}/draws/{i}/t'] = t
        out[f'{case}/draws/{i}/noise'] = noise
      elif step:
        raise RuntimeError(f'{case}: unexpected random draws {step}')
  out['meta'] = np.asarray(json.dumps(dict(
      cases=meta, batch=BATCH, steps=STEPS, num_classes=NUM_CLASSES,
      torch=torch.__version__)))
  return out


def spread(a: dict[str, np.ndarray], b: dict[str, np.ndarray], case: str
           ) -> dict[str, float]:
  """The largest per-tensor differences of `b`'s final weights from `a`'s:
  `elementwise` (max |b - a| / max |a|), `norm` (||b - a|| / ||a||) and
  `update` (||b - a|| / ||a - initial||)."""
  out = dict(elementwise=0.0, norm=0.0, update=0.0)
  for k in a:
    if not k.startswith(case + '/final/'):
      continue
    role, key = k.split('/', 3)[2:]
    x, y = b[k].astype(np.float64), a[k].astype(np.float64)
    moved = np.linalg.norm(y - a[f'init/{role}/{key}'])
    out['elementwise'] = max(out['elementwise'], float(
        np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    out['norm'] = max(out['norm'], float(
        np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    if moved > 0:
      out['update'] = max(out['update'], float(np.linalg.norm(x - y) / moved))
  return out


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  ref_dir, out = flags.FLAGS.reference_dir, flags.FLAGS.output
  if not ref_dir:
    raise app.UsageError('--reference_dir is required')
  ref = import_reference(os.path.expanduser(ref_dir))
  arrays = record(ref)
  # The reference against itself under other float32 rounding (oneDNN off:
  # other convolution kernels): how closely float32 can agree at all.
  with torch.backends.mkldnn.flags(enabled=False):
    again = record(ref)
  control = {case: spread(arrays, again, case) for case in CASES}
  meta = json.loads(str(arrays['meta']))
  meta['control'] = control
  arrays['meta'] = np.asarray(json.dumps(meta))
  np.savez_compressed(out, **arrays)
  print(f'wrote {out} ({len(arrays)} arrays, '
        f'{os.path.getsize(out) / 1e6:.2f} MB)')
  for case in CASES:
    print(f'{case:7s} loss {arrays[case + "/loss"]} lr {arrays[case + "/lr"]}'
          f' beta2 {arrays[case + "/beta2"]}; float32 control: '
          + ', '.join(f'{k} {v:.1e}' for k, v in control[case].items()))


if __name__ == '__main__':
  # Defined here, not at import: the tests import this module for `CASES`.
  flags.DEFINE_string('reference_dir', None, 'Root of a local copy of the '
                      "authors' repository (holding GenDD_cifar/ and "
                      'GenDD_imagenet/).')
  flags.DEFINE_string('output', 'tests/fixtures/step_parity.npz',
                      'Fixture to write.')
  app.run(main)
