"""Every user-facing error type, and the one way a command reports them.

A leaf: it imports nothing from the package, so every room can raise these
without creating an import cycle. Commands catch `USER_ERRORS` and print one
`error:` line with exit status 2 (`fail`); a non-finite training step exits 3,
a preemption (SIGTERM, checkpoint saved) exits 0.
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


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss or gradient."""


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
  """SIGTERM arrived; a checkpoint was saved and the run should exit 0."""


USER_ERRORS = (CheckpointError, ConfigError, ConversionError, DataError,
               ModelError)


def fail(message: str, status: int = 2) -> NoReturn:
  """Prints one `error:` line on stderr and exits with `status`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)
