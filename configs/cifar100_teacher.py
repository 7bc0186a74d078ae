r"""Train a CIFAR-100 teacher from scratch, as the reference scripts do.

SGD with momentum 0.9 and weight decay 5e-4, batch 64, 240 epochs, lr 0.05
(0.01 for mobilenetv2/shufflev1/shufflev2) decayed 10x at epochs 150, 180
and 210, pad-4 random crop and horizontal flip. CIFAR-100 is read from TFDS,
prepared once beforehand (`tfds build cifar100 --data_dir <dir>`):

  python -m gendd_jax.main --config=configs/cifar100_teacher.py:resnet32x4 \
      --workdir=runs/cifar100/resnet32x4 --config.data.data_dir=<dir>

The export in `<workdir>/export` is what `config.teacher.checkpoint` of a
distillation run points at. The argument after ':' is any registered model
(`python -m gendd_jax.cli.zoo --list`); default resnet32x4.

`:tiny` (alone or after the variant, e.g. `cifar100_teacher.py:vgg13,tiny`)
runs the same wiring for two steps per stage on a laptop, with no download and
no teacher file (`config_lib.tiny`: digits at 32x32, batch 4, small head, a
two-step random teacher stage first where the config distils).

Estimated training time (not measured; docs/walltime.md): resnet32x4: ~28 min
on 1 x NVIDIA A100, ~3 min on 8 x NVIDIA A100, ~2 min on 16 x TPU v4.
"""

from gendd_jax import config_lib

# The teachers of the paper's CIFAR-100 pairs (any registered model works).
VARIANTS = ('resnet32x4', 'resnet56', 'resnet110', 'wrn_40_2', 'vgg13',
            'cifar_resnet50')


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, variant='resnet32x4')
  c = config_lib.cifar100(teacher=a.variant)
  return config_lib.tiny(c) if a.tiny else c
