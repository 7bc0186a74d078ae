"""Helpers shared by the test modules (no test module imports another).

* The digits runs several modules build on: `small_config` (the quick digits
  config shrunk to 7 steps per epoch), `teacher_export` (a teacher trained
  once per process), `gendd_config` and `gendd_run` (one uninterrupted GenDD
  stage). They live in a temporary directory made by `set_up_module()` and
  removed (with the cached runs) by `tear_down_module()`; a test module that
  uses them calls both from its own `setUpModule`/`tearDownModule`.
* `REFERENCE`, `has_reference()`: where the tests that run the authors'
  code find a local copy of it (`GENDD_REFERENCE`, default /tmp/gendd_ref).
* `random_head`: a tiny diffusion head with random values in every
  parameter.
* `load_config(stem, arg)`: a file of `configs/` (not a package).
* `export_weights(workdir)`: the weights of a run's export as flat numpy
  arrays, whatever topology wrote them.
* `subprocess_env(devices)`: the environment of a child process (CPU, the
  repository importable, the session's XLA flags and compile cache kept,
  optionally `devices` simulated CPU devices).
* `fresh_venv(path, hide)`: a new virtual environment that sees this one's
  packages (but those in `hide`), to install into without downloading them;
  `installed_wheel(name, dest)`: an installed pure-Python package packed
  back into a wheel; `copy_source(dest)`: what `pip install` needs of the
  working tree, copied.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import site
import subprocess
import sys
import tempfile
from unittest import mock
import zipfile

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from gendd_jax import train
from gendd_jax.models import denoiser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
# A local copy of the authors' PyTorch code (never part of the project), the
# directory holding `GenDD_cifar/`; the tests that run it are skipped without.
REFERENCE = os.environ.get('GENDD_REFERENCE', '/tmp/gendd_ref')
_TMP = None  # A TemporaryDirectory between set_up_module/tear_down_module.


def set_up_module():
  """Makes the temporary directory the cached digits runs live in."""
  global _TMP
  _TMP = tempfile.TemporaryDirectory(prefix='gendd_testing_')


def tear_down_module():
  # The cached runs live in the directory: forget them with it.
  teacher_export.cache_clear()
  gendd_run.cache_clear()
  _TMP.cleanup()


def has_reference() -> bool:
  """Whether `REFERENCE` holds a copy of the authors' CIFAR code."""
  return os.path.isfile(os.path.join(REFERENCE, 'GenDD_cifar', 'diffloss.py'))


def tmp_dir() -> str:
  """The directory made by `set_up_module()`."""
  return _TMP.name


def workdir(name: str) -> str:
  path = os.path.join(_TMP.name, name)
  os.makedirs(path, exist_ok=True)
  return path


def subprocess_env(devices: int | None = None, **extra: str
                   ) -> dict[str, str]:
  """`os.environ` for a child process: CPU only, the repository on
  PYTHONPATH, and `devices` simulated devices added to (not replacing) the
  session's XLA_FLAGS (see conftest.py)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **extra)
  if devices is not None:
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(
        flags + [f'--xla_force_host_platform_device_count={devices}'])
  return env


def fresh_venv(path: str, hide: tuple[str, ...] = ()) -> str:
  """Makes a virtual environment at `path` that also sees this
  environment's packages; returns its python.

  A .pth file adds this environment's site directories (what
  `--system-site-packages` would do for a base interpreter's; that flag is
  not used, since here it would add the base interpreter's packages too,
  which this environment does not see: `pip check` found conflicts among
  them). What is installed into the new one goes to its own site-packages
  and takes precedence, and the installed dependencies count as present
  (nothing is downloaded). It has no pip of its own: `python -m pip` runs
  this environment's pip, which installs into the new one.

  Args:
    path: where to make it.
    hide: top-level names (e.g. 'ml_collections') the new environment does
      not see: the site directories it adds are then views of this
      environment's (a symlink per entry) without those names and their
      `<name>-<version>.dist-info`.
  """
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', path],
                 check=True)
  python = os.path.join(path, 'bin', 'python')
  purelib = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
       '["purelib"])'], capture_output=True, text=True,
      check=True).stdout.strip()
  dirs = site.getsitepackages()
  if hide:
    views = []
    for i, d in enumerate(dirs):
      view = os.path.join(path, f'parent_site_{i}')
      os.makedirs(view)
      for entry in os.listdir(d):
        if not any(entry == h or entry.startswith(h + '-') for h in hide):
          os.symlink(os.path.join(d, entry), os.path.join(view, entry))
      views.append(view)
    dirs = views
  with open(os.path.join(purelib, 'gendd_parent_env.pth'), 'w') as f:
    # A .pth line starting with `import` is executed (no comprehension:
    # it would not see `site` in the namespace the line runs in).
    f.write(f'import site; list(map(site.addsitedir, {dirs!r}))\n')
  return python


def installed_wheel(dist_name: str, dest: str) -> str:
  """Packs the installed pure-Python distribution `dist_name` back into a
  wheel in `dest` (for an offline `pip install`); returns its path."""
  dist = importlib.metadata.distribution(dist_name)
  wheel_info = next(f for f in dist.files if f.name == 'WHEEL')
  if 'Root-Is-Purelib: true' not in wheel_info.read_text():
    raise ValueError(f'{dist_name} is not pure Python')
  name = dist.metadata['Name'].replace('-', '_')
  path = os.path.join(dest, f'{name}-{dist.version}-py3-none-any.whl')
  record, files = [], []
  for f in dist.files:
    if f.suffix == '.pyc' or f.name in ('RECORD', 'INSTALLER', 'REQUESTED',
                                        'direct_url.json'):
      continue
    data = f.locate().read_bytes()
    digest = base64.urlsafe_b64encode(
        hashlib.sha256(data).digest()).rstrip(b'=').decode()
    record.append(f'{f.as_posix()},sha256={digest},{len(data)}')
    files.append((f.as_posix(), data))
  info = wheel_info.parent.as_posix()
  record.append(f'{info}/RECORD,,')
  os.makedirs(dest, exist_ok=True)
  with zipfile.ZipFile(path, 'w') as z:
    for arcname, data in files:
      z.writestr(arcname, data)
    z.writestr(f'{info}/RECORD', '\n'.join(record) + '\n')
  return path


def copy_source(dest: str) -> str:
  """Copies what `pip install` builds from (pyproject.toml and the package,
  without caches) to `dest`, so no build output lands in the repository;
  returns `dest`."""
  os.makedirs(dest, exist_ok=True)
  shutil.copy(os.path.join(ROOT, 'pyproject.toml'), dest)
  shutil.copytree(os.path.join(ROOT, 'gendd_jax'),
                  os.path.join(dest, 'gendd_jax'),
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  return dest


def export_weights(workdir: str) -> dict[str, np.ndarray]:
  """`{'/model/params/...': array}` of `workdir/export`, read onto this
  process's first device (the export may come from several devices or
  processes)."""
  path = os.path.join(workdir, 'export', 'weights')
  ckptr = ocp.StandardCheckpointer()
  stored = ckptr.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = ckptr.restore(path, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      stored))
  flat = {}

  def walk(t, prefix):
    if isinstance(t, dict):
      for k, v in t.items():
        walk(v, f'{prefix}/{k}')
    else:
      flat[prefix] = np.asarray(t)
  walk(tree, '')
  return flat


def config_module(stem: str):
  """`configs/<stem>.py` as a module (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f'config_{stem}', os.path.join(CONFIGS, f'{stem}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(stem: str = 'digits', arg: str | None = 'quick'):
  """`configs/<stem>.py:<arg>` (`arg=None`: the file's default)."""
  module = config_module(stem)
  return module.get_config() if arg is None else module.get_config(arg)


def small_config(stage, epochs=1.0, **stage_overrides):
  """The quick config, shrunk: 7 steps per epoch, tiny head and sampler."""
  c = load_config('digits', 'quick')
  c.stage = stage
  c.gendd.width = 32
  c.gendd.depth = 1
  c.gendd.diffusion_batch_mul = 1
  c.sampler.steps = '4'
  c.sampler.published_steps = '4'
  # The paper's sampler, alone: these runs test the training machinery.
  c.sampler.temperature = 1.0
  c.sampler.init_temperature = 1.0
  c.sampler.clip_x0 = 'none'
  c.sampler.also_eval_clipped = False
  c.sampler.also_eval_published = False
  c.log_every_steps = 1
  for name in c.stages:
    c.stages[name].epochs = float(epochs)
  for k, v in stage_overrides.items():
    c.stages[stage][k] = v
  return c


@functools.lru_cache(maxsize=None)
def teacher_export():
  """Trains the teacher once per process; returns `(export_dir, results)`."""
  path = workdir('teacher')
  res = train.train_and_evaluate(small_config('teacher', epochs=4), path,
                                 quiet=True)
  return os.path.join(path, 'export'), res


def gendd_config(stage='gendd'):
  c = small_config(stage, epochs=2, warmup_epochs=0.5)
  c.teacher.checkpoint = teacher_export()[0]
  c.checkpoint_every_steps = 5  # 14 steps: checkpoints at 5 and 10.
  c.keep_checkpoints = 5
  return c


@functools.lru_cache(maxsize=None)
def gendd_run():
  """An uninterrupted gendd run; returns `(workdir, results)`."""
  path = workdir('gendd_a')
  return path, train.train_and_evaluate(gendd_config(), path, quiet=True)


@functools.lru_cache(maxsize=None)
def random_head(token_dim=4, cond_dim=6, width=16, depth=1, num_tokens=4,
                seed=0, *, freq_dim=32, remat=False, scale=0.2):
  """A tiny head with random weights everywhere (never mutated: cached).

  The adaLN and output layers are zero-initialised (the head would output 0
  whatever its input); random values make every input matter. The values
  come from numpy, so building the head compiles nothing.
  """
  abstract = nnx.eval_shape(lambda: denoiser.DenoiserMLP(
      token_dim, cond_dim, width, depth, num_tokens, freq_dim=freq_dim,
      remat=remat, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
      state)
  return nnx.merge(graphdef, state)


def write_class_folder(root: str, per_split=(('train', 10), ('val', 4)),
                       classes: int = 3, seed: int = 0) -> str:
  """JPEGs in `root/<split>/class<c>/<i>.jpg`, 40x48, each class bright in
  its own channel (learnable); returns `root`."""
  rng = np.random.default_rng(seed)
  for split, n in per_split:
    for c in range(classes):
      folder = os.path.join(root, split, f'class{c}')
      os.makedirs(folder)
      for i in range(n):
        base = np.zeros((40, 48, 3), np.uint8)
        base[..., c % 3] = 200
        img = np.clip(base + rng.integers(0, 50, base.shape), 0,
                      255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format='JPEG', quality=90)
        with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
          f.write(buf.getvalue())
  return root


@contextlib.contextmanager
def killed_at_batch(stream_cls, n: int):
  """Within the block, the `n`-th batch drawn from any `stream_cls` raises
  KeyboardInterrupt (as if the process were killed there), once; every
  other draw is the real one."""
  original = stream_cls.__next__
  drawn = []

  def next_or_die(stream):
    if len(drawn) == n:
      drawn.append(None)  # Raise once only.
      raise KeyboardInterrupt()
    drawn.append(1)
    return original(stream)

  with mock.patch.object(stream_cls, '__next__', next_or_die):
    yield
