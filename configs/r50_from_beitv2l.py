r"""ImageNet: BEiT-v2-L teacher -> ResNet-50 student, A2 recipe (300 epochs).

As `r50_from_beitv2b.py` with the large teacher (1024-d feature: 16 tokens
of 64). For the 600-epoch A1 recipe see `r50_600ep.py`.
"""

from gendd_jax import config_lib


def get_config():
  return config_lib.imagenet(
      'beitv2_large_patch16_224', 'resnet50', epochs=300, weight_decay=2e-2,
      augment='rand', mixup=0.1, cutmix=1.0, smooth=0.9, beta=0.0)
