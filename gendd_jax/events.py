"""TensorBoard event files, written without TensorFlow.

An event file is a sequence of records, each
`length (uint64) | masked crc32c(length) | Event proto | masked crc32c(data)`
(the TFRecord framing), beginning with a `file_version` event; scalars are
float32 tensors for the scalars plugin, as `tf.summary.scalar` writes
them. The protos
come from the `tensorboard` package, which needs no TensorFlow, so a training
run writes its summaries without importing TensorFlow (several seconds of
start-up on a CPU).

Local directories get one file, appended to and flushed on every write.
Object stores (`gs://`) cannot append: buffered records go to a new object
`...tfevents.<time>.<host>.<pid>.<n>` at most every `remote_flush_secs` and
on `flush()`/`close()`; TensorBoard reads every event file of a directory,
in name order.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from gendd_jax import paths


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The record format's masked CRC: rotated right by 15 bits plus a
  constant, so that a CRC of data holding CRCs is not degenerate."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One framed record."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data +
          struct.pack('<I', masked_crc32c(data)))


def read_records(blob: bytes) -> list[bytes]:
  """The records of an event file's bytes; raises ValueError on a bad CRC
  or a truncated record."""
  out, pos = [], 0
  while pos < len(blob):
    if pos + 12 > len(blob):
      raise ValueError(f'truncated record header at byte {pos}')
    header = blob[pos:pos + 8]
    (n,) = struct.unpack('<Q', header)
    (hcrc,) = struct.unpack('<I', blob[pos + 8:pos + 12])
    if hcrc != masked_crc32c(header):
      raise ValueError(f'bad length checksum at byte {pos}')
    data = blob[pos + 12:pos + 12 + n]
    if len(data) != n or pos + 16 + n > len(blob):
      raise ValueError(f'truncated record at byte {pos}')
    (dcrc,) = struct.unpack('<I', blob[pos + 12 + n:pos + 16 + n])
    if dcrc != masked_crc32c(data):
      raise ValueError(f'bad data checksum at byte {pos}')
    out.append(data)
    pos += 16 + n
  return out


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """`tag -> [(step, value), ...]` of every event file in `logdir`, in file
  and record order (what TensorBoard would show)."""
  out: dict[str, list[tuple[int, float]]] = {}
  names = sorted(n for n in paths.listdir(logdir) if '.tfevents.' in n)
  for name in names:
    for data in read_records(paths.read_bytes(paths.join(logdir, name))):
      ev = event_pb2.Event.FromString(data)
      for v in ev.summary.value:
        if v.metadata.plugin_data.plugin_name == 'scalars':
          out.setdefault(v.tag, []).append((ev.step, v.tensor.float_val[0]))
        elif v.HasField('simple_value'):  # The older form.
          out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


def scalar_value(tag: str, value: float):
  """One scalar as TensorFlow 2's `tf.summary.scalar` writes it: a float32
  scalar tensor for TensorBoard's scalars plugin (what its dashboards and
  `EventAccumulator.Tensors` read)."""
  return summary_pb2.Summary.Value(
      tag=tag,
      tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                    float_val=[float(value)]),
      metadata=summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(
              plugin_name='scalars'),
          data_class=summary_pb2.DATA_CLASS_SCALAR))


def hparams_summary(hparams: Mapping[str, Any]):
  """The HParams plugin's session-start summary of `hparams` (booleans,
  numbers and strings as such; anything else as its `str`)."""
  info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
  for name, value in hparams.items():
    slot = info.hparams[str(name)]
    if isinstance(value, bool):
      slot.bool_value = value
    elif isinstance(value, (int, float, np.number)):
      slot.number_value = float(value)
    else:
      slot.string_value = str(value)
  content = plugin_data_pb2.HParamsPluginData(
      version=0, session_start_info=info).SerializeToString()
  meta = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(
          plugin_name='hparams', content=content))
  return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
      tag='_hparams_/session_start_info', metadata=meta)])


_WRITERS = itertools.count()  # Tells apart writers of one process.


class EventWriter:
  """Scalars and hyperparameters into TensorBoard event files in `logdir`.

  `write_scalars(step, {tag: value})`, `write_hparams({name: value})`,
  `flush()` and `close()`, as clu's metric writers. `enabled=False` (every
  process but the first) writes nothing.
  """

  def __init__(self, logdir: str, *, enabled: bool = True,
               remote_flush_secs: float = 120.0):
    self._logdir = logdir
    self._enabled = enabled
    self._remote = paths.is_remote(logdir)
    self._flush_secs = remote_flush_secs
    self._base = (f'events.out.tfevents.{int(time.time()):010d}.'
                  f'{socket.gethostname()}.{os.getpid()}.{next(_WRITERS)}')
    self._pending: list[bytes] = []
    self._written = 0  # Objects written (remote) or 0/1 (local file made).
    self._last_flush = time.time()
    if enabled:
      paths.makedirs(logdir)
      self._add(event_pb2.Event(wall_time=time.time(),
                                file_version='brain.Event:2'))
      self.flush()

  @property
  def path(self) -> str:
    """The local event file (remote: the prefix of the objects)."""
    return paths.join(self._logdir, self._base)

  def _add(self, event) -> None:
    self._pending.append(record(event.SerializeToString()))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    values = [scalar_value(str(k), float(np.asarray(v)))
              for k, v in scalars.items()]
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))
    if not self._remote or time.time() - self._last_flush >= self._flush_secs:
      self.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The hyperparameters, for TensorBoard's HParams dashboard."""
    if not self._enabled:
      return
    self._add(event_pb2.Event(wall_time=time.time(), step=0,
                              summary=hparams_summary(hparams)))
    self.flush()

  def flush(self) -> None:
    if not self._enabled or not self._pending:
      return
    blob = b''.join(self._pending)
    if self._remote:
      paths.write_bytes(f'{self.path}.{self._written:06d}', blob)
    else:
      paths.append_bytes(self.path, blob)
    self._written += 1
    self._pending = []
    self._last_flush = time.time()

  def close(self) -> None:
    self.flush()
