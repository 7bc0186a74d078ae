r"""ImageNet: BEiT-v2-L teacher -> ResNet-50, A1 recipe: the paper's 82.28%.

Stage-1 (20 epochs, lr 2e-3) then GenDD: 600 epochs, lr 2e-3, weight decay
1e-2, batch 512, 20 warm-up epochs, mixup 0.2, cutmix 1.0, label smoothing
0.1, RandAugment, smooth 0.9, beta 0; 64-step CFG (scale 2) sampling.
bfloat16 compute, float32 parameters and optimizer state.

On a TPU pod slice (see launch/README.md):

  python -m gendd_jax.main --distributed --config=configs/r50_600ep.py \
      --workdir=gs://bucket/runs/r50_600ep \
      --config.teacher.checkpoint=gs://bucket/teachers/beitv2_large \
      --config.data.data_dir=gs://bucket/tfds

A smaller slice keeps the global batch with `--config.grad_accum_steps=N`.

`--config=configs/r50_600ep.py:tiny` runs the same wiring for two steps per
stage on a laptop, with no download and no teacher file (`config_lib.tiny`:
digits at 32x32, batch 4, small head, a two-step random teacher stage first).

Estimated training time (not measured; docs/walltime.md): ~31.7 days on 1 x
NVIDIA A100, ~4.0 days on 8 x NVIDIA A100, ~2.2 days on 16 x TPU v4.
"""

from gendd_jax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg)
  c = config_lib.imagenet(
      'beitv2_large_patch16_224', 'resnet50', epochs=600, weight_decay=1e-2,
      augment='rand', mixup=0.2, cutmix=1.0, label_smoothing=0.1,
      smooth=0.9, beta=0.0)
  return config_lib.tiny(c) if a.tiny else c
