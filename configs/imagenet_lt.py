r"""ImageNet-LT: ResNeXt-101 (32x4d) teacher -> ResNet-50 or ResNet-18.

Variants `r50` (default) and `r18`. As the released scripts: GenDD alone
(no stage-1; the student starts from its initialisation), 100 epochs, smooth
0 (no contraction toward the long-tailed labels; labels still train the
probe), Beta(1, 1) feature mixup, weight decay 0.2, batch 256, lr 2e-3, 20
warm-up epochs, cosine. Build the dataset with
`python -m gendd_jax.cli.build_dataset imagenet_lt ...` (see docs/data.md).

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
      batch_size=256, smooth=0.0, stage1=False,
      dataset='imagenet_lt:default')
  c.data.shot_groups = True  # Many/medium/few-shot top-1, as the paper.
  return config_lib.tiny(c) if a.tiny else c
