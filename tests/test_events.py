"""TensorBoard event files written without TensorFlow (`gendd_jax.events`):
readable by TensorBoard's own loader, checksummed, appended locally, one
object per flush on object stores (tests/test_gcs.py runs them on a GCS
server), and a training run that writes them never imports TensorFlow; the
per-step hooks that write steps/s and profiler traces beside them."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util

from gendd_jax import events
from gendd_jax import reporting

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensorboard_events(path):
  return list(event_file_loader.EventFileLoader(path).Load())


class Crc32cTest(absltest.TestCase):

  def test_known_values(self):
    # The check value of CRC-32C and the vectors of RFC 3720, B.4.
    self.assertEqual(events.crc32c(b'123456789'), 0xE3069283)
    self.assertEqual(events.crc32c(bytes(32)), 0x8A9136AA)
    self.assertEqual(events.crc32c(b'\xff' * 32), 0x62A8AB43)
    self.assertEqual(events.crc32c(bytes(range(32))), 0x46DD794E)


class EventWriterTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()

  def test_tensorboard_reads_scalars_and_hparams(self):
    w = events.EventWriter(self.dir)
    w.write_hparams({'stage': 'gendd', 'total_steps': 880, 'lr': 1e-3,
                     'hidden': (256, 64)})
    w.write_scalars(1, {'loss': 2.5, 'lr': 1e-3})
    w.write_scalars(2, {'loss': 1.5})
    w.close()
    got = _tensorboard_events(w.path)
    self.assertEqual(got[0].file_version, 'brain.Event:2')
    # The loader hands the scalars dashboard float tensors.
    scalars = [(e.step, v.tag, v.tensor.float_val[0]) for e in got
               for v in e.summary.value
               if v.metadata.plugin_data.plugin_name == 'scalars']
    self.assertEqual(scalars, [(1, 'loss', 2.5), (1, 'lr', np.float32(1e-3)),
                               (2, 'loss', 1.5)])
    hp = [v for e in got for v in e.summary.value
          if v.metadata.plugin_data.plugin_name == 'hparams']
    self.assertLen(hp, 1)
    self.assertIn(b'gendd', hp[0].metadata.plugin_data.content)
    self.assertIn(b'(256, 64)', hp[0].metadata.plugin_data.content)
    self.assertEqual(events.read_scalars(self.dir),
                     {'loss': [(1, 2.5), (2, 1.5)],
                      'lr': [(1, float(np.float32(1e-3)))]})

  def test_accumulator_reads_them_as_tensors(self):
    # What TensorBoard's dashboards (and the Colab demo's curves) read.
    w = events.EventWriter(self.dir)
    for step in (1, 2, 3):
      w.write_scalars(step, {'diffusion': 1.0 / step})
    w.close()
    acc = event_accumulator.EventAccumulator(
        w.path, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    self.assertEqual(acc.Tags()['tensors'], ['diffusion'])
    got = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
           for e in acc.Tensors('diffusion')]
    self.assertEqual(got, [(1, 1.0), (2, float(np.float32(0.5))),
                           (3, float(np.float32(1 / 3)))])

  def test_reads_the_older_simple_value_form(self):
    ev = event_pb2.Event(step=4, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag='loss', simple_value=0.5)]))
    with open(os.path.join(self.dir, 'events.out.tfevents.1.old'), 'wb') as f:
      f.write(events.record(ev.SerializeToString()))
    self.assertEqual(events.read_scalars(self.dir), {'loss': [(4, 0.5)]})

  def test_local_file_is_flushed_on_every_write(self):
    w = events.EventWriter(self.dir)
    w.write_scalars(7, {'loss': 0.25})
    # Readable while the writer is open: a run killed here keeps it.
    self.assertEqual(events.read_scalars(self.dir), {'loss': [(7, 0.25)]})

  def test_writers_sharing_a_directory_keep_apart(self):
    # E.g. a sequence's stages with one --config.tensorboard_dir.
    a, b = events.EventWriter(self.dir), events.EventWriter(self.dir)
    a.write_scalars(1, {'loss': 1.0})
    b.write_scalars(1, {'loss': 2.0})
    self.assertNotEqual(a.path, b.path)
    self.assertEqual(sorted(v for _, v in
                            events.read_scalars(self.dir)['loss']), [1.0, 2.0])

  def test_disabled_writer_writes_nothing(self):
    w = events.EventWriter(os.path.join(self.dir, 'other'), enabled=False)
    w.write_scalars(1, {'loss': 1.0})
    w.close()
    self.assertFalse(os.path.exists(os.path.join(self.dir, 'other')))

  def test_corrupt_record_is_reported(self):
    w = events.EventWriter(self.dir)
    w.write_scalars(1, {'loss': 1.0})
    w.close()
    with open(w.path, 'rb') as f:
      blob = bytearray(f.read())
    blob[-6] ^= 0xFF
    with self.assertRaisesRegex(ValueError, 'bad data checksum'):
      events.read_records(bytes(blob))
    with self.assertRaisesRegex(ValueError, 'truncated'):
      events.read_records(bytes(blob[:-3]))


class HooksTest(absltest.TestCase):

  def test_progress_and_profile(self):
    logdir = tempfile.mkdtemp()
    writer = events.EventWriter(logdir)
    hooks = [reporting.ReportProgress(writer, every=2, start=0),
             reporting.Profile(logdir, num_steps=2, first=2)]
    f = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))
    with reporting.closing(hooks):
      for step in range(1, 6):
        x = f(x) / 64
        jax.block_until_ready(x)
        for hook in hooks:
          hook(step)
    got = events.read_scalars(logdir)
    self.assertEqual([s for s, _ in got['steps_per_sec']], [2, 4])
    self.assertTrue(all(v > 0 for _, v in got['steps_per_sec']))
    self.assertEqual([s for s, _ in got['uptime']], [2, 4])
    traces = [f for _, _, files in os.walk(
        os.path.join(logdir, 'plugins', 'profile')) for f in files]
    self.assertTrue(any(f.endswith('.xplane.pb') for f in traces), traces)
    self.assertFalse(hooks[1].active)

  def test_closing_stops_a_trace_cut_short(self):
    logdir = tempfile.mkdtemp()
    hook = reporting.Profile(logdir, num_steps=100, first=1)
    with self.assertRaises(KeyboardInterrupt):
      with reporting.closing([hook]):
        hook(1)
        self.assertTrue(hook.active)
        raise KeyboardInterrupt
    self.assertFalse(hook.active)
    # Stopped: a new trace can start.
    jax.profiler.start_trace(tempfile.mkdtemp())
    jax.profiler.stop_trace()


_NO_TF = r'''
import sys
from gendd_jax import train
import importlib.util
spec = importlib.util.spec_from_file_location('c', sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
c = m.get_config('tiny')
with c.unlocked():
  c.stage = 'teacher'
res = train.train_and_evaluate(c, sys.argv[2], quiet=True)
import json
print(json.dumps({'tf': 'tensorflow' in sys.modules, 'steps': res['steps']}))
'''


class NoTensorFlowTest(absltest.TestCase):

  def test_training_run_does_not_import_tensorflow(self):
    workdir = tempfile.mkdtemp()
    out = subprocess.run(
        [sys.executable, '-c', _NO_TF,
         os.path.join(_ROOT, 'configs', 'digits.py'), workdir],
        capture_output=True, text=True, cwd=_ROOT, check=False,
        env=dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS='cpu'))
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    self.assertFalse(got['tf'])
    # The summaries were written all the same (the loss at the last step).
    self.assertEqual(events.read_scalars(workdir)['loss'][-1][0],
                     got['steps'])


if __name__ == '__main__':
  absltest.main()
