r"""Command-line entry point.

  python -m gendd_jax.main --config=configs/digits.py --workdir=runs/digits \
      [--config.key=value ...]

(after `pip install .`, the same as `gendd-train --config=... --workdir=...`).

Hands `(config, workdir)` to the pipeline (if `config.stage == 'pipeline'`) or
to `train.train_and_evaluate`. User errors (bad settings, missing inputs)
print one line and exit with their status (`errors.exit_status`). One run
at a time holds a workdir (`reliability.WorkdirLock`).
"""

from __future__ import annotations

import sys

from absl import flags

from gendd_jax import errors
from gendd_jax import pipeline
from gendd_jax import reliability
from gendd_jax import reporting
from gendd_jax import train
from gendd_jax.cli import common
from gendd_jax.errors import fail

for _name in ('config', 'workdir', 'distributed', 'coordinator_address',
              'num_processes', 'process_id', 'heartbeat_timeout'):
  flags.declare_key_flag(_name)


def main(argv: list[str]) -> None:
  config, workdir = common.config_and_workdir(argv)
  common.initialize_distributed()
  print(common.devices_line(), flush=True)
  if config.get('fast_compile', False):
    print('fast_compile: XLA compiles without backend optimisation '
          '(quicker to compile, slower steps: a smoke test, not training)',
          flush=True)
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


def entry() -> None:
  """The `gendd-train` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
