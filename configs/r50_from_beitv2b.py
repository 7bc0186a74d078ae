r"""ImageNet: BEiT-v2-B teacher -> ResNet-50 student, A2 recipe (300 epochs).

Stage-1 (20 epochs) then GenDD: 300 epochs, lr 2e-3, weight decay 2e-2,
batch 512, 20 warm-up epochs, mixup 0.1, cutmix 1.0, RandAugment (m7,
colour jitter), smooth 0.9, feature mixup off (beta 0). bfloat16 compute
(the reference: float32).

  python -m gendd_jax.main --config=configs/r50_from_beitv2b.py \
      --workdir=<dir> --config.teacher.checkpoint=<beitv2_base export>

`--config=configs/r50_from_beitv2b.py:tiny` runs the same wiring for two steps
per stage on a laptop, with no download and no teacher file (`config_lib.tiny`:
digits at 32x32, batch 4, small head, a two-step random teacher stage first).

Estimated training time (not measured; docs/walltime.md): ~7.1 days on 1 x
NVIDIA A100, ~21.4 h on 8 x NVIDIA A100, ~12.1 h on 16 x TPU v4.
"""

from gendd_jax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg)
  c = config_lib.imagenet(
      'beitv2_base_patch16_224', 'resnet50', epochs=300, weight_decay=2e-2,
      augment='rand', mixup=0.1, cutmix=1.0, smooth=0.9, beta=0.0)
  return config_lib.tiny(c) if a.tiny else c
