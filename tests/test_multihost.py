"""A real two-process run on localhost (`jax.distributed`, 2 CPU devices
each): per-process input slices assembled into global batches, orbax
checkpoints with one data-iterator state per process, evaluation gathered
on every process."""

import io
import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from gendd_jax.data import builders
import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r'''
import json, sys
pid, port, data_dir, workdir = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                sys.argv[4])
sys.path.insert(0, {root!r})
import jax
jax.distributed.initialize(f'localhost:{{port}}', 2, pid)
from gendd_jax import config_lib, train
c = config_lib.cifar100('resnet8', 'resnet8')
c.data = config_lib.image_data('folder:tiny', image_size=32,
                               augment='regular', batch_size=8,
                               eval_batch_size=8, eval_split='val')
c.data.data_dir = data_dir
c.data.num_threads = 1
c.data.prefetch = 4
c.stage = 'teacher'
c.stages.teacher.epochs = 2.0
c.stages.teacher.decay_epochs = (1.0,)
c.checkpoint_every_steps = 3
res = train.train_and_evaluate(c, workdir, quiet=True)
print('RESULT', json.dumps(dict(
    pid=pid, devices=jax.device_count(), local=jax.local_device_count(),
    steps=res['steps'], acc=res['accuracy']['acc'],
    index=sorted(res['index']))), flush=True)
'''


class TwoProcessTest(absltest.TestCase):

  def test_two_processes_train_checkpoint_and_evaluate(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      rng = np.random.default_rng(0)
      # 23 training images: shards of 12 and 11, i.e. 3 and 2 local batches
      # of 4 if each process counted its own; 13 validation images.
      for split, counts in (('train', (8, 8, 7)), ('val', (5, 4, 4))):
        for c, n in enumerate(counts):
          folder = os.path.join(src, split, f'class{c}')
          os.makedirs(folder)
          for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 40, 3)).astype(
                np.uint8)).save(buf, format='JPEG')
            with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
              f.write(buf.getvalue())
      data_dir = os.path.join(tmp, 'tfds')
      builders.build('folder', src, data_dir, 'tiny',
                     log=lambda *a, **k: None)
      sock = socket.socket()
      sock.bind(('localhost', 0))
      port = sock.getsockname()[1]
      sock.close()
      script = os.path.join(tmp, 'worker.py')
      with open(script, 'w') as f:
        f.write(_WORKER.format(root=_ROOT))
      workdir = os.path.join(tmp, 'run')
      env = testing.subprocess_env(devices=2)
      procs = [subprocess.Popen(
          [sys.executable, script, str(p), str(port), data_dir, workdir],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True) for p in range(2)]
      results = []
      for p in procs:
        out, err = p.communicate(timeout=400)
        self.assertEqual(p.returncode, 0, err[-3000:])
        line = [ln for ln in out.splitlines() if ln.startswith('RESULT')]
        results.append(json.loads(line[0][len('RESULT '):]))
      states = sorted(os.listdir(os.path.join(workdir, 'checkpoints', '3',
                                              'data')))
      with open(os.path.join(workdir, 'checkpoints', '3', 'data',
                             'process_1-of-2.json')) as f:
        state_1 = json.load(f)
    a, b = results
    self.assertEqual((a['devices'], a['local']), (4, 2))
    # Both processes run 2 steps per epoch (11 // 4), for 2 epochs.
    self.assertEqual((a['steps'], b['steps']), (4, 4))
    self.assertEqual(a['acc'], b['acc'])  # Gathered: the same everywhere.
    self.assertEqual(a['index'], list(range(13)))  # Every val image once.
    self.assertEqual(b['index'], a['index'])
    self.assertIn('process_0-of-2.json', states)
    self.assertIn('process_1-of-2.json', states)
    # Process 1 read 3 steps x 4 local examples of its own slice by step 3.
    self.assertEqual(state_1, {'next_index': 12})


if __name__ == '__main__':
  absltest.main()
