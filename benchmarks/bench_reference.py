"""Times the authors' PyTorch implementation on the settings of `bench`.

The authors' code is not part of this project. Give the path of a local copy
(the directory holding `GenDD_cifar/`, whose `diffloss.py`, `diffusion/` and
`models/` are imported from there) and

  python -m benchmarks.bench --settings=head_only,cifar --reference_dir=PATH

runs both implementations on the same machine in one invocation. torch is
imported only here, only when asked. Their modules are used as they are:
`models.DiffModel` (the GenDD stage-2 wrapper around `DiffLoss`), their CIFAR
ResNets, their respaced Gaussian diffusion; the train step is their
stage-2 iteration (teacher forward without gradients, student + diffusion
loss + cross-entropy, backward, AdamW step) and the evaluation their
`forward_test_stage2` (student forward, CFG sampling at scale 2 over the
concatenated conditional and unconditional rows, classifier). Their sampler
moves its noise to the GPU unconditionally; on a CPU-only machine
`Tensor.cuda` is made the identity while their code runs.

Multiply-accumulates of the work done are counted with
`torch.utils.flop_counter.FlopCounterMode` (matrix products and
convolutions, backward included) at batch sizes 1 and 2 and extrapolated
linearly to the timed batch (every counted product is linear in the batch;
a third size checks it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Callable

_MODULES = ('models', 'diffloss', 'diffusion')
_LOADED: set[str] = set()  # Roots `load` imported from in this process.


def load(path: str) -> types.SimpleNamespace:
  """Imports torch and the authors' CIFAR code from `path`.

  Args:
    path: directory holding `GenDD_cifar/` (or that directory itself).

  Returns:
    Namespace with `torch`, `DiffModel`, `model_dict`, `root`.

  A copy loaded earlier from another directory in the same process is
  replaced: its modules are dropped from `sys.modules` and its directory from
  `sys.path` (objects built from it keep working).

  Raises:
    FileNotFoundError: `path` has no `GenDD_cifar/diffloss.py`.
    ImportError: a module of the same name was already imported from a
      directory that is not a copy of the authors' code.
  """
  root = _root(path)
  if root is None:
    raise FileNotFoundError(f'no GenDD_cifar/diffloss.py under {path!r}')
  for name in _MODULES:
    mod = sys.modules.get(name)
    if mod is None or _under(mod, root):
      continue
    other = _copy_root(mod)
    if other is None:
      raise ImportError(f'a module named {name!r} is already imported from '
                        f'{getattr(mod, "__file__", "?")}, which is not a '
                        "copy of the authors' code")
    _unload(other)
  import torch  # pylint: disable=g-import-not-at-top
  if root not in sys.path:
    sys.path.insert(0, root)
  import models  # pylint: disable=g-import-not-at-top,import-error
  if not _under(models, root):
    raise ImportError(f'imported models from {models.__file__}, not {root}')
  _LOADED.add(root)
  return types.SimpleNamespace(torch=torch, DiffModel=models.DiffModel,
                               model_dict=models.model_dict, root=root)


def _root(path: str) -> str | None:
  """The `GenDD_cifar` directory at or under `path`, or None."""
  root = os.path.abspath(path)
  if os.path.basename(root) != 'GenDD_cifar':
    root = os.path.join(root, 'GenDD_cifar')
  return root if os.path.isfile(os.path.join(root, 'diffloss.py')) else None


def _under(module, root: str) -> bool:
  f = getattr(module, '__file__', None) or ''
  return os.path.abspath(f).startswith(root + os.sep)


def _copy_root(module) -> str | None:
  """The copy of the authors' code `module` was imported from, or None."""
  f = getattr(module, '__file__', None)
  if not f:
    return None
  for root in _LOADED:
    if _under(module, root):
      return root
  d = os.path.dirname(os.path.abspath(f))
  while os.path.basename(d) != 'GenDD_cifar':
    parent = os.path.dirname(d)
    if parent == d:
      return None
    d = parent
  return d if _root(d) == d else None


def _unload(root: str) -> None:
  """Forgets every module imported from `root`, and `root` on `sys.path`."""
  _LOADED.discard(root)
  for name in [n for n, m in sys.modules.items()
               if m is not None and _under(m, root)]:
    del sys.modules[name]
  sys.path[:] = [p for p in sys.path if os.path.abspath(p) != root]


@contextlib.contextmanager
def cpu_cuda(torch):
  """`Tensor.cuda` is the identity inside (the sampler calls it)."""
  if torch.cuda.is_available():
    yield
    return
  saved = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *a, **k: self
  try:
    yield
  finally:
    torch.Tensor.cuda = saved


def set_threads(ref, num_threads: int | None) -> int:
  """Intra-op threads for torch (default: every core, as XLA's CPU client
  uses); returns `torch.get_num_threads()`."""
  ref.torch.set_num_threads(num_threads or os.cpu_count() or 1)
  return ref.torch.get_num_threads()


def _adamw(ref, model, lr: float, b2: float, weight_decay: float):
  """AdamW with the diffusion head and LayerNorms undecayed, as the authors
  group parameters."""
  head, rest = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (head if 'ln' in name or 'diffloss' in name else rest).append(p)
  return ref.torch.optim.AdamW(
      [dict(params=head, weight_decay=0.0),
       dict(params=rest, weight_decay=weight_decay)],
      lr=lr, betas=(0.9, b2))


def _parts(torch, model, opt, loss_fn: Callable, eval_input
           ) -> dict[str, Callable]:
  """`{train, eval}`: one optimiser step on `loss_fn()` with the model in
  training mode; one evaluation forward of `eval_input` without gradients."""

  def train_once():
    model.train()
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()

  def eval_once():
    model.eval()
    with torch.no_grad(), cpu_cuda(torch):
      model(eval_input)

  return dict(train=train_once, eval=eval_once)


# ---------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------


def head_only_parts(ref, batch: int, *, feature_dim=2048, token_dim=64,
                    width=1024, depth=3, mul=10, sampling_steps='64',
                    num_classes=1000, seed=0) -> dict[str, Callable]:
  """`DiffModel` over random features (a pass-through backbone): the
  stage-2 diffusion loss with LayerNorm projector, no contraction, no
  mixing; evaluation is their 64-step CFG sampling plus classifier."""
  torch = ref.torch
  nn = torch.nn

  class Features(nn.Module):
    """Backbone stand-in: the input rows are the features."""

    def __init__(self):
      super().__init__()
      self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x, is_feat=False, preact=False):
      del preact
      logits = self.fc(x)
      return ([x], logits) if is_feat else logits

  torch.manual_seed(seed)
  model = ref.DiffModel(
      Features(), classifier=nn.Linear(feature_dim, num_classes),
      feature_dim=feature_dim, target_dim=feature_dim, smooth=0.0,
      num_sampling=1, beta=0.0, diffloss_d=depth, diffloss_w=width,
      num_sampling_steps=sampling_steps, diffusion_batch_mul=mul,
      token_dim=token_dim, cond_drop_prob=0.2)
  opt = _adamw(ref, model, 1e-4, 0.96, 0.0)
  feat_s = torch.randn(batch, feature_dim)
  feat_t = torch.randn(batch, feature_dim)

  def loss_fn():
    return model(feat_s, target_feature=feat_t)[0]

  return _parts(torch, model, opt, loss_fn, feat_s)


def cifar_parts(ref, batch: int, *, teacher='resnet32x4',
                student='resnet8x4', token_dim=64, width=1024, depth=3,
                mul=30, sampling_steps='100', smooth=0.7, beta=1.0,
                num_classes=100, seed=0) -> dict[str, Callable]:
  """Their CIFAR-100 stage-2 iteration on random 32x32 images (randomly
  initialised teacher and student) and their sampling evaluation."""
  torch = ref.torch
  torch.manual_seed(seed)
  net_t = ref.model_dict[teacher](num_classes=num_classes)
  net_s = ref.model_dict[student](num_classes=num_classes)
  model = ref.DiffModel(
      net_s, classifier=net_t.fc, feature_dim=net_s.fc.in_features,
      target_dim=net_t.fc.in_features, smooth=smooth, num_sampling=1,
      beta=beta, diffloss_d=depth, diffloss_w=width,
      num_sampling_steps=sampling_steps, diffusion_batch_mul=mul,
      token_dim=token_dim, cond_drop_prob=0.2)
  opt = _adamw(ref, model, 1e-3, 0.95, 5e-2)
  ce = torch.nn.CrossEntropyLoss()
  images = torch.randn(batch, 3, 32, 32)
  labels = torch.randint(0, num_classes, (batch,))

  def loss_fn():
    net_t.eval()
    with torch.no_grad():
      feats_t, _ = net_t(images, is_feat=True, preact=False)
    diff_loss, logits = model(images, y=labels, target_feature=feats_t[-1])
    return diff_loss + ce(logits, labels)

  return _parts(torch, model, opt, loss_fn, images)


# ---------------------------------------------------------------------------
# Work counted.
# ---------------------------------------------------------------------------


def count_flops(ref, fn: Callable[[], None]) -> int:
  """FLOPs (2 per multiply-add) of the matrix products and convolutions
  `fn` runs, backward included."""
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  mode = flop_counter.FlopCounterMode(display=False)
  with mode, cpu_cuda(ref.torch):
    fn()
  return int(mode.get_total_flops())


def flops_at(ref, make_parts: Callable[[int], dict[str, Callable]],
             batch: int) -> dict[str, dict[str, float]]:
  """Per-part FLOPs at `batch`, extrapolated from batches 1 and 2.

  Returns:
    `{part: {flops, linearity_error}}`; the error is the relative gap
    between the count at batch 3 and its extrapolation.
  """
  counts = {b: {k: count_flops(ref, f) for k, f in make_parts(b).items()}
            for b in (1, 2, 3)}
  out = {}
  for part in counts[1]:
    f1, f2, f3 = (counts[b][part] for b in (1, 2, 3))
    slope = f2 - f1
    err = abs(f1 + 2 * slope - f3) / max(f3, 1)
    out[part] = dict(flops=float(f1 + (batch - 1) * slope),
                     linearity_error=err)
  return out
