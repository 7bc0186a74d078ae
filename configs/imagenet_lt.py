r"""ImageNet-LT: ResNeXt-101 (32x4d) teacher -> ResNet-50 or ResNet-18.

Variants `r50` (default) and `r18`. Stage-1 (20 epochs) then GenDD with
smooth 0 (no contraction toward the long-tailed labels), weight decay 0.2,
batch 256, lr 2e-3, 10 warm-up epochs. The epoch count is not given in the
paper's text; 100 matches its other ImageNet runs. Build the dataset with
`python -m gendd_jax.cli.build_dataset imagenet_lt ...` (see README).

`:tiny` (alone or after the variant, e.g. `imagenet_lt.py:r18,tiny`) runs the
same wiring for two steps per stage on a laptop, with no download and no
teacher file (`config_lib.tiny`: digits at 32x32, batch 4, small head, a two-
step random teacher stage first where the config distils).
"""

from gendd_jax import config_lib

VARIANTS = ('r50', 'r18')


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, variant='r50')
  variant = a.variant
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/imagenet_lt.py;'
                     f' expected one of {", ".join(VARIANTS)}')
  student = {'r50': 'resnet50', 'r18': 'resnet18'}[variant]
  c = config_lib.imagenet(
      'resnext101_32x4d', student, epochs=100, weight_decay=0.2,
      batch_size=256, smooth=0.0, dataset='imagenet_lt:default')
  return config_lib.tiny(c) if a.tiny else c
