"""The exception types that mean "bad input", reported as one line."""

from gendd_jax.checkpoint import CheckpointError
from gendd_jax.data import DataError
from gendd_jax.models import ModelError
from gendd_jax.train import ConfigError

USER_ERRORS = (CheckpointError, ConfigError, DataError, ModelError)
