"""Builds an image dataset as TFDS `array_record` for training.

  python -m gendd_jax.cli.build_dataset folder --src /data/pets \\
      --data_dir ~/tfds
  python -m gendd_jax.cli.build_dataset imagenet_lt --src /data/imagenet \\
      --lists /data/imagenet_lt_lists --data_dir ~/tfds
  python -m gendd_jax.cli.build_dataset unlabeled --src '/data/cc3m/*.tar' \\
      --data_dir ~/tfds --name cc3m
  python -m gendd_jax.cli.build_dataset npz --src arrays.npz --data_dir ~/tfds
  python -m gendd_jax.cli.build_dataset tfds --name imagenet2012 \
      --src /data/imagenet_tars --data_dir ~/tfds   # manual_dir: the tars
  python -m gendd_jax.cli.build_dataset tfds --name cifar100 --data_dir ~/tfds

The kinds and their source layouts are described in `gendd_jax.data.builders`;
`tfds` prepares a catalogue dataset in `array_record` format (imagenet2012
from its manual tars in `--src`, checked first; others are downloaded by
TFDS, so run it where the internet is reachable). Training names them
`data.name = '<kind>:<name>'`, e.g. 'tfds:imagenet2012', 'folder:pets'.
The dataset is then read with `tfds.data_source('<builder>/<name>',
data_dir=...)`; the command prints that name. Bad input ends with one
`error: ...` line and exit status 2, and leaves no partial dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import flags

from gendd_jax.data import builders
from gendd_jax import errors
from gendd_jax import paths
from gendd_jax.cli import common

_SRC = flags.DEFINE_string(
    'src', None, 'Image folder (folder), ImageNet folder (imagenet_lt), glob '
    'of .tar shards (unlabeled) or .npz file (npz).')
_NAME = flags.DEFINE_string(
    'name', None, 'Dataset name (default: from the --src file name for '
    "folder and npz, else 'default').")
_LISTS = flags.DEFINE_string(
    'lists', None, 'imagenet_lt: folder with ImageNet_LT_{train,val,'
    'test}.txt (default: --src).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Rebuild a dataset that already exists.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Threads reading and '
                                'checking images (default: up to 8).')
flags.declare_key_flag('data_dir')


def prepare_tfds(name: str, data_dir: str, manual_dir: str | None) -> str:
  """Prepares catalogue dataset `name` as array_record; returns its name."""
  # tensorflow_datasets imports TensorFlow (heavy); only `tfds` needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name == 'imagenet2012':
    if not manual_dir:
      raise builders.BuildError('imagenet2012 needs --src <folder with '
                                'ILSVRC2012_img_train.tar and '
                                'ILSVRC2012_img_val.tar>')
    builders.check_imagenet_manual_dir(manual_dir)
  # array_record writes local files only: a remote data_dir gets a dataset
  # prepared on local disk and uploaded.
  remote = paths.is_remote(data_dir)
  local = tempfile.mkdtemp(prefix='gendd-tfds-') if remote else data_dir
  try:
    builder = tfds.builder(name, data_dir=local, file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    if remote:
      sub = os.path.relpath(builder.data_dir, local)
      paths.upload(builder.data_dir, f'{data_dir.rstrip("/")}/{sub}',
                   last=('dataset_info.json',))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()
    raise builders.BuildError(
        f'preparing TFDS dataset {name!r} failed: {type(e).__name__}: '
        f'{first[0] if first else ""}') from e
  finally:
    if remote:
      shutil.rmtree(local, ignore_errors=True)
  return name


def main(argv: list[str]) -> int:
  """`argv[1]`: the kind, one of `builders.KINDS` or 'tfds'."""
  if len(argv) != 2:
    errors.fail(f'give one dataset kind ({", ".join(builders.KINDS)}, tfds)'
                if len(argv) < 2 else
                f'unexpected arguments: {" ".join(argv[2:])}')
  # `~` in a path is expanded here: after `--flag=` the shell leaves it.
  kind, data_dir = argv[1], paths.expand(common.DATA_DIR.value)
  src, lists = paths.expand(_SRC.value), paths.expand(_LISTS.value)
  if not data_dir:
    errors.fail('--data_dir is required')
  data_dir = paths.absolute(data_dir)
  if kind == 'tfds':
    if not _NAME.value:
      raise builders.BuildError('kind tfds needs --name <TFDS dataset>')
    name = prepare_tfds(_NAME.value, data_dir, src)
    print(f"train with --config.data.name='tfds:{name}' "
          f'--config.data.data_dir={data_dir}')
    return 0
  if src is None:
    errors.fail('--src is required for kind ' + kind)
  result = builders.build(kind, src, data_dir, _NAME.value,
                          lists=lists, overwrite=_OVERWRITE.value,
                          workers=_WORKERS.value)
  short = result['name'].split('/', 1)[1]
  print(f"train with --config.data.name='{kind}:{short}' "
        f'--config.data.data_dir={data_dir} (or read it with '
        f'tfds.data_source({result["name"]!r}, data_dir=..., split=...))')
  return 0


def entry() -> None:
  """The `gendd-build-dataset` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
