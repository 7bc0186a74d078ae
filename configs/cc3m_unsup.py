r"""Unsupervised distillation on CC3M, evaluated on ImageNet (no labels used).

Variants (`--config=configs/cc3m_unsup.py:<variant>`):
  r18     ResNet-34 -> ResNet-18, unsupervised GenDD (smooth 0);
  r18_kl  the same pair, KL-to-teacher baseline;
  mbv1    ResNet-50 -> MobileNetV1, unsupervised GenDD;
  mbv1_kl the same pair, KL baseline.
GenDD: 100 epochs, AdamW lr 2e-3, weight decay 2e-2, batch 512, warm-up 20,
cosine, Beta(1, 1) feature mixup. KL baseline (the released script): SGD
lr 0.2, momentum 0.9, weight decay 1e-4, warm-up 10, temperature 1, the
student's classifier frozen at its initialisation.
CC3M is built once from its image shards:

  python -m gendd_jax.cli.build_dataset unlabeled --src '/data/cc3m/*.tar' \
      --name cc3m --data_dir <tfds dir>

`:tiny` (alone or after the variant, e.g. `cc3m_unsup.py:mbv1_kl,tiny`) runs
the same wiring for two steps per stage on a laptop, with no download and no
teacher file (`config_lib.tiny`: digits at 32x32, batch 4, small head, a two-
step random teacher stage first where the config distils).

Estimated training time (not measured; docs/walltime.md): r18: ~46.5 h on 1 x
NVIDIA A100, ~5.8 h on 8 x NVIDIA A100, ~3.3 h on 16 x TPU v4.
Estimated training time (not measured; docs/walltime.md): mbv1: ~3.5 days on 1
x NVIDIA A100, ~10.4 h on 8 x NVIDIA A100, ~5.9 h on 16 x TPU v4.
Estimated training time (not measured; docs/walltime.md): mbv1_kl: ~19.8 h on 1
x NVIDIA A100, ~2.5 h on 8 x NVIDIA A100, ~1.4 h on 16 x TPU v4.
"""

from gendd_jax import config_lib

VARIANTS = ('r18', 'r18_kl', 'mbv1', 'mbv1_kl')
_PAIRS = {'r18': ('resnet34', 'resnet18'), 'mbv1': ('resnet50',
                                                    'mobilenet_v1')}


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, variant='r18')
  variant = a.variant
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/cc3m_unsup.py; '
                     f'expected one of {", ".join(VARIANTS)}')
  teacher, student = _PAIRS[variant.split('_')[0]]
  c = config_lib.imagenet(
      teacher, student, epochs=100, weight_decay=2e-2,
      dataset='unlabeled:cc3m', eval_name='tfds:imagenet2012',
      unsupervised=True)
  c.data.num_classes = 1000  # From the teacher; CC3M has no labels.
  if variant.endswith('_kl'):
    c.pipeline.stages = ('kl',)
  return config_lib.tiny(c) if a.tiny else c
