r"""Command-line entry point.

  python -m gendd_jax.main --config=configs/digits.py --workdir=runs/digits \
      [--config.key=value ...]

Hands `(config, workdir)` to the pipeline (if `config.stage == 'pipeline'`) or
to `train.train_and_evaluate`. User errors (bad settings, missing inputs)
print one line and exit with their status (`errors.exit_status`). One run
at a time holds a workdir (`reliability.WorkdirLock`).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax

from gendd_jax import errors
from gendd_jax import pipeline
from gendd_jax import reliability
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
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100,
    'With --distributed: seconds without a heartbeat after which a peer '
    'process counts as lost; every other process then exits with status 7 '
    'naming it (instead of waiting in a collective).')


def _initialize_distributed() -> None:
  """`jax.distributed.initialize` as the flags ask (before any JAX use)."""
  if _DISTRIBUTED.value:
    try:
      jax.distributed.initialize(
          coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
          heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    except (RuntimeError, ValueError) as e:
      fail(f'jax.distributed.initialize failed: {e}')
    # Earlier than JAX's own verdict (an abort with a C++ stack trace).
    timeout = _HEARTBEAT_TIMEOUT.value
    reliability.PeerWatch(timeout=timeout / 2,
                          interval=min(2.0, timeout / 20)).start()
  elif any(f.value is not None
           for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    fail('--coordinator_address/--num_processes/--process_id need '
         '--distributed')


def main(argv: list[str]) -> None:
  config, workdir = common.config_and_workdir(argv)
  _initialize_distributed()
  print(common.devices_line(), flush=True)
  try:
    with reliability.WorkdirLock(workdir):
      if config.stage == 'pipeline':
        pipeline.run(config, workdir)
      else:
        res = train.train_and_evaluate(config, workdir)
        print(f'{config.stage}: {reporting.accuracies(res["accuracy"])} '
              f'(results in {workdir}/results.json)', flush=True)
  except errors.Preempted as e:  # SIGTERM: checkpoint saved, exit cleanly.
    print(str(e), flush=True)
    sys.exit(0)
  except (errors.NonFiniteError,) + errors.USER_ERRORS as e:
    fail(str(e), errors.exit_status(e))


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
