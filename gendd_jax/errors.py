"""Every user-facing error type, and the one way a command reports them.

A leaf: it imports nothing from the package, so every room can raise these
without creating an import cycle. Commands catch `USER_ERRORS` and print one
`error:` line (`fail`) with the error's exit status (`exit_status`):

  0  a preemption (SIGTERM, checkpoint saved): not an error
  2  a user error: bad settings, missing or unreadable inputs
  3  a non-finite training step
  4  a resume refused: the config differs from the checkpoint's
  5  the workdir is held by another live run
  6  a resume refused: the checkpoint cannot be restored into this run
     (another state tree or process count)
  7  a peer process of a multi-process run was lost
"""

from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
  """The configuration is inconsistent."""


class DataError(ValueError):
  """A dataset cannot be built or read with the given settings."""


class PipelineError(DataError):
  """An input pipeline cannot be built from the given settings."""


class PrecomputeError(DataError):
  """Features cannot be precomputed or read with the given settings."""


class BuildError(DataError):
  """A dataset cannot be built from the given source."""


class CorruptImageError(ValueError):
  """Encoded image bytes that cannot be decoded (the pipeline skips them)."""


class ModelError(ValueError):
  """A model cannot be built from the given settings."""


class ConversionError(ValueError):
  """A state dict does not fit the target model."""


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the model."""


class ConfigChangedError(CheckpointError):
  """Resuming with a config that differs in what the saved state depends on
  (schedule, model, batch, data)."""
  exit_status = 4


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint that does not fit this run (another state tree or
  process count); it is left in place."""
  exit_status = 6


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""
  exit_status = 5


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss or gradient."""
  exit_status = 3


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
  """SIGTERM arrived; a checkpoint was saved and the run should exit 0."""


USER_ERRORS = (CheckpointError, ConfigError, ConversionError, DataError,
               ModelError, WorkdirBusyError)


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of `e`'s message (at most `limit` characters)."""
  text = str(e).strip().splitlines()
  return text[0][:limit] if text else ''


def exit_status(error: BaseException) -> int:
  """The exit status a command reports `error` with (see the table above)."""
  return getattr(error, 'exit_status', 2)


def fail(message: str, status: int = 2) -> NoReturn:
  """Prints one `error:` line on stderr and exits with `status`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)
