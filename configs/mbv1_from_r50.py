r"""ImageNet: ResNet-50 teacher -> MobileNetV1 student (the paper's Table 1).

Stage-1 (20 epochs, lr 2e-3, AdamW) then GenDD: 100 epochs, lr 2e-3,
weight decay 2e-2, batch 512, 20 warm-up epochs, cosine, smooth 0.9,
64-step CFG sampling. bfloat16 compute.

  python -m gendd_jax.main --config=configs/mbv1_from_r50.py \
      --workdir=<dir> --config.teacher.checkpoint=<resnet50 export> \
      --config.data.data_dir=<tfds dir>
"""

from gendd_jax import config_lib


def get_config():
  return config_lib.imagenet('resnet50', 'mobilenet_v1', epochs=100,
                             weight_decay=2e-2, warmup_epochs=20)
