"""The device mesh, sharding specs and global-batch assembly.

One 1-D mesh axis, `data`: parameters are replicated and the batch is split
along it, so the same program runs on one CPU, simulated CPU devices, a GPU
host or a TPU slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def create_mesh(num_devices: int | None = None) -> Mesh:
  """A `('data',)` mesh over all (or the first `num_devices`) devices.

  Built with `Mesh` directly so the axis type is Auto: slicing a sharded
  array inside jit then needs no explicit sharding annotations.
  """
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices, only '
                       f'{len(devices)} are visible')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch size'
                     ) -> None:
  n = mesh.devices.size
  if batch_size < 1:
    raise ValueError(f'{what} must be positive, got {batch_size}')
  if batch_size % n:
    raise ValueError(f'{what} {batch_size} is not divisible by the {n} '
                     'devices of the mesh')


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh
                ) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays split along `data`."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
