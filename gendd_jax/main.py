r"""Command-line entry point.

  python -m gendd_jax.main --config=configs/digits.py --workdir=runs/digits \
      [--config.key=value ...]

Hands `(config, workdir)` to the pipeline (if `config.stage == 'pipeline'`) or
to `train.train_and_evaluate`. User errors (bad settings, missing inputs)
print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from gendd_jax import errors
from gendd_jax import pipeline
from gendd_jax import reporting
from gendd_jax import train
from gendd_jax.cli import common
from gendd_jax.errors import fail

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


def config_and_workdir(argv: list[str]):
  """The parsed `(config, absolute workdir)`; sets up logging and JAX."""
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = common.CONFIG.value
    if config is not None:
      config.get('stage')  # A file that failed to load raises on access.
  except OSError as e:  # config_flags defers file errors to first access.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    fail(f'could not load the config file: {lines[-1] if lines else e}')
  if config is None or common.WORKDIR.value is None:
    fail('both --config and --workdir are required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Keep library INFO logs out.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if _DISTRIBUTED.value:
    try:
      jax.distributed.initialize(
          coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    except (RuntimeError, ValueError) as e:
      fail(f'jax.distributed.initialize failed: {e}')
  elif any(f.value is not None
           for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    fail('--coordinator_address/--num_processes/--process_id need '
         '--distributed')
  print(f'JAX {jax.__version__}: {jax.device_count()} device(s) '
        f'({jax.devices()[0].platform}), {jax.process_count()} process(es)',
        flush=True)
  workdir = common.WORKDIR.value
  # Local paths become absolute; remote ones (gs://...) stay as given.
  return config, workdir if '://' in workdir else os.path.abspath(workdir)


def main(argv: list[str]) -> None:
  config, workdir = config_and_workdir(argv)
  try:
    if config.stage == 'pipeline':
      pipeline.run(config, workdir)
    else:
      res = train.train_and_evaluate(config, workdir)
      print(f'{config.stage}: {reporting.accuracies(res["accuracy"])} '
            f'(results in {workdir}/results.json)', flush=True)
  except errors.Preempted as e:  # SIGTERM: checkpoint saved, exit cleanly.
    print(str(e), flush=True)
    sys.exit(0)
  except errors.USER_ERRORS as e:
    fail(str(e))
  except errors.NonFiniteError as e:
    fail(str(e), status=3)


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
