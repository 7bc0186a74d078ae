r"""ImageNet: ResNet-50 teacher -> MobileNetV1 student (the paper's Table 1).

Stage-1 (20 epochs, lr 2e-3, AdamW) then GenDD: 100 epochs, lr 2e-3,
weight decay 2e-2, batch 512, 20 warm-up epochs, cosine, smooth 0.9,
Beta(1, 1) feature mixup, 64-step CFG sampling (5 draws in standalone
evaluation). bfloat16 compute (the reference: float32).

  python -m gendd_jax.main --config=configs/mbv1_from_r50.py \
      --workdir=<dir> --config.teacher.checkpoint=<resnet50 export> \
      --config.data.data_dir=<tfds dir>

`--config=configs/mbv1_from_r50.py:tiny` runs the same wiring for two steps per
stage on a laptop, with no download and no teacher file (`config_lib.tiny`:
digits at 32x32, batch 4, small head, a two-step random teacher stage first).

Estimated training time (not measured; docs/walltime.md): ~37.4 h on 1 x NVIDIA
A100, ~4.7 h on 8 x NVIDIA A100, ~2.7 h on 16 x TPU v4.
"""

from gendd_jax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg)
  c = config_lib.imagenet('resnet50', 'mobilenet_v1', epochs=100,
                          weight_decay=2e-2, warmup_epochs=20)
  return config_lib.tiny(c) if a.tiny else c
