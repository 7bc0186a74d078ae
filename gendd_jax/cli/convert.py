"""The teacher-import command: a PyTorch checkpoint -> an export.

    python -m gendd_jax.cli.convert --arch=resnet50 --checkpoint=r50.pth \
        --out=teachers/r50 [--num_classes=1000] [--image_size=224]

writes an export that `config.teacher.checkpoint` loads. The conversion
itself (key mapping, layouts, reading `.safetensors` and torch pickles) is
`gendd_jax.models.torch_import`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import flags
from flax import nnx
import numpy as np

from gendd_jax import checkpoint as ckpt_lib
from gendd_jax import errors
from gendd_jax import models
from gendd_jax import paths
from gendd_jax.cli import common
from gendd_jax.errors import ConversionError
from gendd_jax.models import torch_import

_ARCH = flags.DEFINE_string('arch', None, 'Registered model name, e.g. '
                            'resnet50, resnet32x4, beitv2_large_patch16_224.')
for _name in ('checkpoint', 'out', 'num_classes', 'image_size'):
  flags.declare_key_flag(_name)


def convert(arch: str, checkpoint: str, out: str, num_classes: int,
            image_size: int, channels: int = 3) -> dict[str, Any]:
  """Builds `arch`, loads `checkpoint` into it and writes an export."""
  if os.path.exists(os.path.join(out, 'meta.json')):
    raise ConversionError(f'{out} already holds an export; choose another '
                          '--out or delete it first')
  state_dict = torch_import.read_checkpoint(checkpoint)
  input_shape = (image_size, image_size, channels)
  model = torch_import.empty_model(lambda: models.create_backbone(
      arch, num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0)))
  torch_import.load_state_dict(model, state_dict)
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  meta = dict(stage='teacher', model=arch, num_classes=num_classes,
              input_shape=list(input_shape), source=os.path.abspath(
                  checkpoint), params=models.param_count(model))
  ckpt_lib.save_export(out, dict(params=params, batch_stats=stats), meta)
  return meta


def default_image_size(arch: str) -> int:
  return getattr(models.REGISTRY[arch], 'default_image_size', 224)


def infer_num_classes(arch: str, state_dict: Mapping[str, Any],
                      image_size: int) -> int:
  """Reads the class count off the classifier weight in `state_dict`."""
  model = nnx.eval_shape(lambda: models.create_backbone(
      arch, num_classes=7, input_shape=(image_size, image_size, 3),
      rngs=nnx.Rngs(0)))
  key = torch_import.torch_key(('fc', 'kernel'),
                               getattr(model, 'TORCH_RENAMES', ()))
  if key not in state_dict:
    raise ConversionError(f'cannot find the classifier {key!r} in the '
                          'checkpoint; pass --num_classes')
  return int(np.shape(state_dict[key])[0])


def main(argv: list[str]) -> int:
  try:
    return _convert_command(argv)
  except ValueError as e:  # ConversionError, and bad values of the models.
    errors.fail(str(e))


def _convert_command(argv: list[str]) -> int:
  if len(argv) > 1:
    raise ConversionError(f'unexpected arguments: {" ".join(argv[1:])}')
  arch = _ARCH.value
  checkpoint, out = (paths.expand(common.CHECKPOINT.value),
                     paths.expand(common.OUT.value))
  missing = [f'--{n}' for n, v in (('arch', arch), ('checkpoint', checkpoint),
                                   ('out', out)) if not v]
  if missing:
    raise ConversionError(f'{", ".join(missing)} required')
  checkpoint, out = paths.absolute(checkpoint), paths.absolute(out)
  if arch not in models.REGISTRY:
    raise ConversionError(f'unknown --arch {arch!r}; available: '
                          f'{", ".join(models.BACKBONES)}')
  image_size = common.IMAGE_SIZE.value or default_image_size(arch)
  num_classes = common.NUM_CLASSES.value
  if num_classes is None:
    num_classes = infer_num_classes(
        arch, torch_import.read_checkpoint(checkpoint), image_size)
  meta = convert(arch, checkpoint, out, num_classes, image_size)
  print(f'wrote {out}: {meta["model"]}, {meta["params"]:,} parameters, '
        f'{meta["num_classes"]} classes')
  return 0


def entry() -> None:
  """The `gendd-convert` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
