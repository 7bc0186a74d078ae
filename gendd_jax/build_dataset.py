"""Builds an image dataset as TFDS `array_record` for training.

  python -m gendd_jax.build_dataset folder --src /data/pets --data_dir ~/tfds
  python -m gendd_jax.build_dataset imagenet_lt --src /data/imagenet \\
      --lists /data/imagenet_lt_lists --data_dir ~/tfds
  python -m gendd_jax.build_dataset unlabeled --src '/data/cc3m/*.tar' \\
      --data_dir ~/tfds --name cc3m
  python -m gendd_jax.build_dataset npz --src arrays.npz --data_dir ~/tfds
  python -m gendd_jax.build_dataset tfds --name imagenet2012 \
      --src /data/imagenet_tars --data_dir ~/tfds   # manual_dir: the tars
  python -m gendd_jax.build_dataset tfds --name cifar100 --data_dir ~/tfds

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

import argparse
import sys

from gendd_jax.data import builders


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m gendd_jax.build_dataset',
      description='Build an image dataset as TFDS array_record.')
  parser.add_argument('kind', help=f'one of: {", ".join(builders.KINDS)}, '
                      'tfds')
  parser.add_argument('--src', default=None,
                      help='image folder (folder), ImageNet folder '
                      '(imagenet_lt), glob of .tar shards (unlabeled) or '
                      '.npz file (npz)')
  parser.add_argument('--data_dir', required=True, help='TFDS data folder')
  parser.add_argument('--name', default=None,
                      help='dataset name (default: from the --src file name '
                      "for folder and npz, else 'default')")
  parser.add_argument('--lists', default=None,
                      help='imagenet_lt: folder with ImageNet_LT_{train,val,'
                      'test}.txt (default: --src)')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild a dataset that already exists')
  parser.add_argument('--workers', type=int, default=None,
                      help='threads reading and checking images (default: '
                      'up to 8)')
  return parser.parse_args(argv)


def prepare_tfds(name: str, data_dir: str, manual_dir: str | None) -> str:
  """Prepares catalogue dataset `name` as array_record; returns its name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name == 'imagenet2012':
    if not manual_dir:
      raise builders.BuildError('imagenet2012 needs --src <folder with '
                                'ILSVRC2012_img_train.tar and '
                                'ILSVRC2012_img_val.tar>')
    builders.check_imagenet_manual_dir(manual_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir,
                           file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()
    raise builders.BuildError(
        f'preparing TFDS dataset {name!r} failed: {type(e).__name__}: '
        f'{first[0] if first else ""}') from e
  return name


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.kind == 'tfds':
    try:
      if not args.name:
        raise builders.BuildError('kind tfds needs --name <TFDS dataset>')
      name = prepare_tfds(args.name, args.data_dir, args.src)
    except builders.BuildError as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      return 2
    print(f"train with --config.data.name='tfds:{name}' "
          f'--config.data.data_dir={args.data_dir}')
    return 0
  if args.src is None:
    print('error: --src is required for kind ' + args.kind, file=sys.stderr)
    return 2
  try:
    result = builders.build(args.kind, args.src, args.data_dir, args.name,
                            lists=args.lists, overwrite=args.overwrite,
                            workers=args.workers)
  except builders.BuildError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  short = result['name'].split('/', 1)[1]
  print(f"train with --config.data.name='{args.kind}:{short}' "
        f'--config.data.data_dir={args.data_dir} (or read it with '
        f'tfds.data_source({result["name"]!r}, data_dir=..., split=...))')
  return 0


if __name__ == '__main__':
  sys.exit(main())
