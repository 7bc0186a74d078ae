"""The device mesh, sharding specs and global-batch assembly.

The mesh is described in the config (`config.mesh`: axis name -> size, -1
for every remaining device). Today one axis, `data`: parameters are
replicated and the batch is split along it, so the same program runs on one
CPU, simulated CPU devices, a GPU host or a TPU pod slice. Other axis names
are reserved for model parallelism and rejected until implemented.
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
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


AXES = ('data',)


def mesh_from_config(mesh_cfg) -> Mesh:
  """The mesh described by `config.mesh` (`{'data': n}`; n = -1 or 0: all
  devices of every process)."""
  axes = dict(mesh_cfg)
  extra = sorted(set(axes) - set(AXES))
  if extra:
    raise ValueError(f'mesh axes {extra} are not implemented; only data '
                     'parallelism (mesh.data) is supported')
  n = int(axes.get('data', -1))
  if n < -1:
    raise ValueError(f'mesh.data must be -1 (all devices) or positive, got '
                     f'{n}')
  if n > 0 and jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(f'mesh.data={n} on a {jax.process_count()}-process run '
                     f'must span all {jax.device_count()} devices (use -1)')
  return create_mesh(n if n > 0 else None)


def describe(mesh: Mesh) -> str:
  """E.g. `data=8 (8 tpu devices, 2 processes)`."""
  devs = mesh.devices.reshape(-1)
  shape = ' x '.join(f'{k}={v}' for k, v in mesh.shape.items())
  procs = len({d.process_index for d in devs})
  kind = getattr(devs[0], 'device_kind', devs[0].platform)
  return (f'{shape} ({len(devs)} {devs[0].platform} device(s): {kind}; '
          f'{procs} process(es))')


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


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on some process (every process must call)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_process0(values: np.ndarray) -> np.ndarray:
  """Process 0's `values` (same shape and dtype everywhere) on every
  process."""
  if jax.process_count() == 1:
    return np.asarray(values)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_rows(tree, mesh: Mesh):
  """This process's rows (numpy) of global arrays split along `data`: the
  inverse of `shard_batch`."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  local = multihost_utils.global_array_to_host_local_array(
      tree, mesh, P('data'))
  return jax.tree.map(np.asarray, local)
