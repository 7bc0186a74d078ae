r"""CIFAR-100 GenDD for every teacher-student pair of the paper.

`--config=configs/cifar100_gendd.py:<teacher>-<student>`, e.g.
`resnet32x4-resnet8x4` (default), `resnet56-resnet20`, `resnet110-resnet32`,
`wrn_40_2-wrn_16_2`, `wrn_40_2-wrn_40_1`, `vgg13-vgg8`, `vgg13-resnet20`,
`wrn_40_2-resnet8x4` (the eight released pairs), `resnet32x4-shufflev1`,
`resnet32x4-shufflev2`, `vgg13-mobilenetv2`, `cifar_resnet50-mobilenetv2`.
Stage-1 (50 epochs, lr 3e-3, weight decay 5e-2, batch 64, cosine) then
GenDD (240 epochs, lr 1e-3, or 0.01 for MobileNetV2/ShuffleNet students,
warm-up 50, x0.1 at epochs 150, 180 and 210, Beta(1, 1) feature mixup,
diffusion_batch_mul 30, smooth per pair as in the released scripts,
100-step CFG sampling, 5 draws in standalone evaluation), float32
(`docs/recipes.md`). The teacher comes from
`configs/cifar100_teacher.py` or `python -m gendd_jax.cli.convert`:

  python -m gendd_jax.main --config=configs/cifar100_gendd.py:vgg13-vgg8 \
      --workdir=runs/vgg8 --config.teacher.checkpoint=runs/vgg13/export

`:tiny` (alone or after the variant, e.g. `cifar100_gendd.py:vgg13-vgg8,tiny`)
runs the same wiring for two steps per stage on a laptop, with no download and
no teacher file (`config_lib.tiny`: digits at 32x32, batch 4, small head, a
two-step random teacher stage first where the config distils).

Estimated training time (not measured; docs/walltime.md): resnet32x4-resnet8x4:
~1.2 h on 1 x NVIDIA A100, ~9 min on 8 x NVIDIA A100, ~5 min on 16 x TPU v4.
"""

from gendd_jax import config_lib

VARIANTS = tuple(config_lib.CIFAR_PAIRS)


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, variant='resnet32x4-resnet8x4')
  c = config_lib.cifar100_gendd(a.variant)
  return config_lib.tiny(c) if a.tiny else c
