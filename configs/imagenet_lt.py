r"""ImageNet-LT: ResNeXt-101 (32x4d) teacher -> ResNet-50 or ResNet-18.

Variants `r50` (default) and `r18`, the distillations, and `teacher`, the
ResNeXt-101 (32x4d) teacher trained from scratch on ImageNet-LT as the released
`main_lt_sgd.py` does: SGD (momentum 0.9, L2 weight decay 5e-4 on every
parameter), lr 0.1, batch 256, 100 epochs, 10 warm-up epochs, cosine to 0,
crops from 8% of the area, cross-entropy. Its export is what the
distillations' `--config.teacher.checkpoint` points at. As the released GenDD
scripts: GenDD alone
(no stage-1; the student starts from its initialisation), 100 epochs, smooth
0 (no contraction toward the long-tailed labels; labels still train the
probe), Beta(1, 1) feature mixup, weight decay 0.2, batch 256, lr 2e-3, 20
warm-up epochs, cosine. Build the dataset with
`python -m gendd_jax.cli.build_dataset imagenet_lt ...` (see docs/data.md).

`:tiny` (alone or after the variant, e.g. `imagenet_lt.py:r18,tiny`) runs the
same wiring for two steps per stage on a laptop, with no download and no
teacher file (`config_lib.tiny`: digits at 32x32, batch 4, small head, a two-
step random teacher stage first where the config distils).

Estimated training time (not measured; docs/walltime.md): r50: ~5.3 h on 1 x
NVIDIA A100, ~40 min on 8 x NVIDIA A100, ~23 min on 16 x TPU v4.
Estimated training time (not measured; docs/walltime.md): r18: ~4.4 h on 1 x
NVIDIA A100, ~33 min on 8 x NVIDIA A100, ~19 min on 16 x TPU v4.
Estimated training time (not measured; docs/walltime.md): teacher: ~3.3 h on 1
x NVIDIA A100, ~25 min on 8 x NVIDIA A100, ~14 min on 16 x TPU v4.
"""

from gendd_jax import config_lib

VARIANTS = ('r50', 'r18', 'teacher')


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, variant='r50')
  variant = a.variant
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/imagenet_lt.py;'
                     f' expected one of {", ".join(VARIANTS)}')
  student = {'r18': 'resnet18'}.get(variant, 'resnet50')
  c = config_lib.imagenet(
      'resnext101_32x4d', student, epochs=100, weight_decay=0.2,
      batch_size=256, smooth=0.0, stage1=False,
      dataset='imagenet_lt:default')
  c.data.shot_groups = True  # Many/medium/few-shot top-1, as the paper.
  if variant == 'teacher':
    c.stage = 'teacher'
    c.stages.teacher = config_lib.stage(
        100, 0.1, weight_decay=5e-4, warmup_epochs=10, optimizer='sgd',
        b1=0.9, crop_scale=0.08)
  return config_lib.tiny(c) if a.tiny else c
