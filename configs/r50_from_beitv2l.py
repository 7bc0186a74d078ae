r"""ImageNet: BEiT-v2-L teacher -> ResNet-50 student, A2 recipe (300 epochs).

As `r50_from_beitv2b.py` with the large teacher (1024-d feature: 16 tokens
of 64). For the 600-epoch A1 recipe see `r50_600ep.py`.

`--config=configs/r50_from_beitv2l.py:tiny` runs the same wiring for two steps
per stage on a laptop, with no download and no teacher file (`config_lib.tiny`:
digits at 32x32, batch 4, small head, a two-step random teacher stage first).

Estimated training time (not measured; docs/walltime.md): ~15.9 days on 1 x
NVIDIA A100, ~47.8 h on 8 x NVIDIA A100, ~27.1 h on 16 x TPU v4.
"""

from gendd_jax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg)
  c = config_lib.imagenet(
      'beitv2_large_patch16_224', 'resnet50', epochs=300, weight_decay=2e-2,
      augment='rand', mixup=0.1, cutmix=1.0, smooth=0.9, beta=0.0)
  return config_lib.tiny(c) if a.tiny else c
