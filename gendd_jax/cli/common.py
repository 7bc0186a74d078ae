"""What every command shares: the flags that mean the same thing in several
tools (defined once, so importing two tools never clashes), flag parsing that
reports mistakes as one line, and running a `main` so that user errors
(`errors.USER_ERRORS`) print one `error:` line and exit with status 2.

A command declares the shared flags it takes as key flags
(`flags.declare_key_flag`), so its `--help` lists them. Each command module
has an `entry()` function, the console script `pip install` makes of it
(`gendd-train`, `gendd-evaluate`, ...; see `pyproject.toml`).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from absl.testing import flagsaver
import jax
from ml_collections import config_flags

from gendd_jax import errors
from gendd_jax import paths
from gendd_jax import reliability

CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configuration file (optionally `file.py:arg`).',
    lock_config=True)
WORKDIR = flags.DEFINE_string(
    'workdir', None, 'A training run directory (checkpoints, logs, exports '
    'and results).')
OUT = flags.DEFINE_string(
    'out', None, 'Where the command writes its result: export and convert, '
    'a directory that must not exist yet; evaluate, a JSON file; '
    'sweep_sampling, a path prefix (<out>.json, .md and .png).')
CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'What to read: an export directory (evaluate) or a '
    'PyTorch checkpoint, .pth/.pt/.bin (needs torch) or .safetensors '
    '(convert).')
DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data folder '
                               '(evaluate: overrides data.data_dir).')
BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Batch size.')
SEED = flags.DEFINE_integer('seed', None, 'Seed of the sampler noise '
                            '(default: the config\'s seed, which draws the '
                            'same noise as training-time evaluation).')
NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'Classes of the model (convert: default, read off '
    'the classifier in the checkpoint; zoo: 100 for CIFAR models, else '
    '1000).')
IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'Input resolution (default 32 for the CIFAR models, '
    'else 224).')
CLIP_X0 = flags.DEFINE_string(
    'clip_x0', None, "x0 clipping of the sampler: 'none', 'data' (the "
    "training targets' range), a number, or dynamic thresholding relative to "
    "that range, 'dynamic[:P]' (rescale) or 'dynamic_clip[:P]' (default: "
    "evaluate, the config's; sweep_sampling takes a comma-separated list, "
    "default 'none', the paper's).")


_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() (multi-host TPU/GPU launches). On a '
    'TPU pod slice and under SLURM or Open MPI the cluster is detected; '
    'elsewhere also pass --coordinator_address, --num_processes and '
    '--process_id.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 (multi-node GPU without a cluster manager).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Total number of processes (one per host).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process\'s index in [0, num_processes).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100,
    'With --distributed: seconds without a heartbeat after which a peer '
    'process counts as lost; every other process then exits with status 7 '
    'naming it (instead of waiting in a collective).')


def initialize_distributed() -> None:
  """`jax.distributed.initialize` as the flags ask (before any JAX use),
  and a `reliability.PeerWatch` that names a lost process."""
  if _DISTRIBUTED.value:
    try:
      jax.distributed.initialize(
          coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
          heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    except (RuntimeError, ValueError) as e:
      errors.fail(f'jax.distributed.initialize failed: {e}')
    # Earlier than JAX's own verdict (an abort with a C++ stack trace).
    timeout = _HEARTBEAT_TIMEOUT.value
    reliability.PeerWatch(timeout=timeout / 2,
                          interval=min(2.0, timeout / 20)).start()
  elif any(f.value is not None
           for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    errors.fail('--coordinator_address/--num_processes/--process_id need '
                '--distributed')


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing that reports a bad flag or `--config.*` override as one
  `error:` line (status 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    errors.fail(str(e).splitlines()[0] if str(e) else repr(e))
  except (AttributeError, KeyError) as e:
    key = str(e).strip('"\'')
    errors.fail(f'unknown config key {key!r} in a --config.* override (see '
                'the config file for the available keys)')
  except (TypeError, ValueError) as e:
    errors.fail(f'bad configuration: {e}')
  except SystemExit as e:
    # Only absl's --help/--helpshort/--helpfull/--helpxml exit while
    # parsing, with status 1 after printing; asking for help succeeds.
    sys.exit(0 if e.code == 1 else e.code)


def config_and_workdir(argv: list[str]):
  """The parsed `(--config, absolute --workdir)` of a command that takes
  both; keeps library INFO logs out unless `--verbosity` is given."""
  if len(argv) > 1:
    errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = CONFIG.value
    if config is not None:
      config.get('stage')  # A file that failed to load raises on access.
  except OSError as e:  # config_flags defers file errors to first access.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors.fail(f'could not load the config file: '
                f'{lines[-1] if lines else e}')
  if config is None or WORKDIR.value is None:
    errors.fail('both --config and --workdir are required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if config.get('fast_compile', False):
    fast_compile()
  # Local paths become absolute (`~` expanded); gs://... stays as given.
  return config, paths.absolute(WORKDIR.value)


# XLA options of `config.fast_compile`: no backend (LLVM) optimisation.
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0',
                      '--xla_llvm_disable_expensive_passes=true')


def fast_compile() -> None:
  """Adds `FAST_COMPILE_FLAGS` to `XLA_FLAGS` (those not already given),
  which XLA reads when JAX starts its backend: so before that, or not at
  all (a warning says so)."""
  from jax._src import xla_bridge  # No public query for this.
  if xla_bridge.backends_are_initialized():
    logging.warning('fast_compile: JAX has already started its backend; '
                    'compiling with the default XLA options')
    return
  given = os.environ.get('XLA_FLAGS', '').split()
  names = {f.split('=')[0] for f in given}
  extra = [f for f in FAST_COMPILE_FLAGS if f.split('=')[0] not in names]
  os.environ['XLA_FLAGS'] = ' '.join(given + extra)


def devices_line() -> str:
  """What this process sees: JAX version, devices and processes."""
  return (f'JAX {jax.__version__}: {jax.device_count()} device(s) '
          f'({jax.devices()[0].platform}), {jax.process_count()} '
          'process(es)')


def _reporting(main: Callable[[list[str]], int | None]):
  """`main` with user errors turned into `errors.fail`."""

  def wrapped(argv: list[str]) -> int | None:
    try:
      return main(argv)
    except errors.USER_ERRORS as e:
      errors.fail(str(e), errors.exit_status(e))

  return wrapped


def run(main: Callable[[list[str]], int | None],
        module: str = '__main__') -> None:
  """`absl.app.run(main)`; `errors.USER_ERRORS` print one `error:` line and
  exit with status 2. `main` returns the exit status (None: 0).

  Args:
    main: the command's `main(argv)`.
    module: the name of the module defining the command. A console script
      (`gendd-evaluate`, ...) imports it under its own name, while absl's
      `--help` shows the docstring and flags of `__main__` (the generated
      wrapper); they are shown for `module` instead.
  """
  if module != '__main__':
    _help_for(module)
  own = sys.argv[0] if module == '__main__' else module

  def checked(argv: list[str]) -> int | None:
    others = foreign_flags(own)
    if others:
      errors.fail(f'{", ".join("--" + n for n in others)}: not a flag of '
                  'this command (see --help)')
    return main(argv)

  app.run(_reporting(checked), flags_parser=parse_flags)


def foreign_flags(module: str) -> list[str]:
  """The flags given on the command line that are the project's but not
  `module`'s (its key flags: defined or declared there).

  Every command's process defines the shared flags, and sweep_sampling
  evaluate's; without this check a flag of another command would be
  accepted and ignored.
  """
  own = {id(f) for f in flags.FLAGS.get_key_flags_for_module(module)}
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = set()
  for name, defined in flags.FLAGS.flags_by_module_dict().items():
    # Imported modules go by name, one run with `python -m` by its path.
    if (name.split('.')[0] == 'gendd_jax' or
        os.path.abspath(name).startswith(package + os.sep)):
      names.update(f.name for f in defined
                   if f.present and id(f) not in own)
  return sorted(names)


def _help_for(module: str) -> None:
  """Makes `--help` describe `module` (a console script's command)."""
  for flag in flags.FLAGS.get_key_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get('__main__')
  if main_module is not None:
    main_module.__doc__ = sys.modules[module].__doc__


def call(main: Callable[[list[str]], int | None], argv: Sequence[str]
         ) -> int:
  """Runs a command's `main` in this process as `run` would with the
  command-line arguments `argv` (no program name); returns its exit status.
  Flag values are restored afterwards."""
  with flagsaver.flagsaver():
    try:
      status = _reporting(main)(parse_flags([sys.argv[0], *argv]))
    except SystemExit as e:
      status = e.code
  return 0 if status is None else int(status)
