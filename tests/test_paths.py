"""The path layer (`gendd_jax/paths.py`): `~` is expanded wherever a path is
read, because the shell leaves a `~` after `--flag=` as it is.

Each reader is given `~/...` with `HOME` pointed at a temporary folder: the
training workdir, an export (`teacher.checkpoint`, `student.init_from`,
`evaluate --checkpoint`), `build_dataset --src/--data_dir` and the data
layer's `data.data_dir`.
"""

import json
import os
import tempfile
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
import numpy as np

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import paths
from gendd_jax.cli import build_dataset
from gendd_jax.cli import common
from gendd_jax.data import streams
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExpandTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory(prefix='gendd_home_')
    self.addCleanup(tmp.cleanup)
    self.home = tmp.name
    patcher = mock.patch.dict(os.environ, {'HOME': self.home})
    patcher.start()
    self.addCleanup(patcher.stop)

  def test_expand(self):
    self.assertEqual(paths.expand('~/tfds'), os.path.join(self.home, 'tfds'))
    self.assertEqual(paths.expand('gs://b/~x'), 'gs://b/~x')
    self.assertEqual(paths.expand(''), '')
    self.assertIsNone(paths.expand(None))
    self.assertEqual(paths.expand('runs/a'),
                     os.path.join(os.getcwd(), 'runs', 'a'))

  def test_workdir(self):
    argv = ['prog', f'--config={_ROOT}/configs/digits.py:quick',
            '--workdir=~/runs/x']
    with flagsaver.flagsaver():
      flags.FLAGS(argv)
      _, workdir = common.config_and_workdir(['prog'])
    self.assertEqual(workdir, os.path.join(self.home, 'runs', 'x'))

  def test_export_metadata(self):
    export = os.path.join(self.home, 'teachers', 't')
    os.makedirs(export)
    with open(os.path.join(export, 'meta.json'), 'w') as f:
      json.dump(dict(model='mlp'), f)
    self.assertEqual(ckpt_lib.load_export_meta('~/teachers/t'),
                     dict(model='mlp'))

  def test_build_dataset_and_data_dir(self):
    np.savez(os.path.join(self.home, 'arrays.npz'),
             images=np.zeros((2, 3, 3, 3), np.uint8),
             labels=np.array([0, 1]))
    status = common.call(build_dataset.main,
                         ['npz', '--src=~/arrays.npz', '--data_dir=~/tfds'])
    self.assertEqual(status, 0)
    self.assertTrue(os.path.isdir(os.path.join(self.home, 'tfds')))
    self.assertFalse(os.path.exists(os.path.join(os.getcwd(), '~')))
    source = streams.open_source('npz:arrays', 'train', '~/tfds')
    self.assertLen(source, 2)


if __name__ == '__main__':
  absltest.main()
