r"""ImageNet: ResNet-34 teacher -> ResNet-18 student (the paper's Table 1).

Stage-1 (20 epochs, lr 2e-3, AdamW) then GenDD: 100 epochs, lr 2e-3,
weight decay 2e-2, batch 512, 10 warm-up epochs, cosine, smooth 0.9,
Beta(1, 1) feature mixup, random-resized-crop + flip, 64-step CFG sampling
(5 draws in standalone evaluation). bfloat16 compute (the reference:
float32).

  python -m gendd_jax.cli.convert --arch resnet34 \
      --checkpoint resnet34-b627a593.pth --out teachers/resnet34
  python -m gendd_jax.main --config=configs/r18_from_r34.py \
      --workdir=gs://bucket/runs/r18_from_r34 \
      --config.teacher.checkpoint=teachers/resnet34 \
      --config.data.data_dir=gs://bucket/tfds

`--config=configs/r18_from_r34.py:tiny` runs the same wiring for two steps per
stage on a laptop, with no download and no teacher file (`config_lib.tiny`:
digits at 32x32, batch 4, small head, a two-step random teacher stage first).

Estimated training time (not measured; docs/walltime.md): ~22.3 h on 1 x NVIDIA
A100, ~2.8 h on 8 x NVIDIA A100, ~1.6 h on 16 x TPU v4.
"""

from gendd_jax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg)
  c = config_lib.imagenet('resnet34', 'resnet18', epochs=100,
                          weight_decay=2e-2, warmup_epochs=10)
  return config_lib.tiny(c) if a.tiny else c
