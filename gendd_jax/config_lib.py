"""Building blocks shared by the files in `configs/`.

Configs stay the single source of hyperparameters; this module only fixes the
shape of the recurring blocks so every config names the same keys.
"""

from __future__ import annotations

import ml_collections


def stage(epochs: float, lr: float, *, weight_decay: float = 1e-4,
          warmup_epochs: float = 0.0, optimizer: str = 'adamw',
          schedule: str = 'cosine', decay_epochs: tuple[float, ...] = (),
          decay_rate: float = 0.1, min_lr: float = 0.0, b1: float = 0.9,
          nesterov: bool = False, beta2_min: float = 0.999,
          beta2_max: float = 0.999) -> ml_collections.ConfigDict:
  """One stage's optimiser settings (epochs may be fractional).

  Args:
    epochs: length of the stage.
    lr: peak learning rate (after `warmup_epochs` of linear warm-up).
    weight_decay: decoupled for 'adamw'; added to the gradient (L2, as torch's
      `SGD(weight_decay=...)`) for 'sgd'.
    warmup_epochs: linear warm-up from 0.
    optimizer: 'adamw' or 'sgd'.
    schedule: 'cosine' (to `min_lr`), 'step' (times `decay_rate` at each of
      `decay_epochs`) or 'constant'.
    decay_epochs: epochs of the 'step' schedule's decays.
    decay_rate: factor of each 'step' decay.
    min_lr: end value of the cosine schedule.
    b1: Adam beta1, or the SGD momentum.
    nesterov: Nesterov momentum for 'sgd'.
    beta2_min: Adam beta2 at the start (it rises by a half cosine).
    beta2_max: Adam beta2 at the end.
  """
  return ml_collections.ConfigDict(dict(
      epochs=float(epochs), lr=lr, weight_decay=weight_decay,
      warmup_epochs=float(warmup_epochs), optimizer=optimizer,
      schedule=schedule, decay_epochs=tuple(float(e) for e in decay_epochs),
      decay_rate=decay_rate, min_lr=min_lr, b1=b1, nesterov=nesterov,
      beta2_min=beta2_min, beta2_max=beta2_max))


def teacher_block(model: str, **settings) -> ml_collections.ConfigDict:
  """The teacher: its model, its export (`checkpoint`), and where its
  outputs come from during training: 'model' (a forward pass per step) or
  'precomputed' (`features`, written by `python -m gendd_jax.precompute`)."""
  return ml_collections.ConfigDict(dict(
      model=model, checkpoint='', source='model', features='', **settings))


def precompute_block() -> ml_collections.ConfigDict:
  """Settings of `python -m gendd_jax.precompute`: augmented `views` per
  example beside the deterministic one, their seed, the stored dtype,
  whether to keep logits (for kd/kl), records per shard."""
  return ml_collections.ConfigDict(dict(
      views=0, aug_seed=0, dtype='float32', logits=False,
      shard_size=100_000))


# Teachers whose reference learning rate is 0.01 instead of 0.05.
_CIFAR_LOW_LR = ('mobilenetv2', 'shufflev1', 'shufflev2')


def cifar100(teacher: str = 'resnet32x4', student: str = 'resnet8x4'
             ) -> ml_collections.ConfigDict:
  """CIFAR-100 settings of the reference scripts, for any stage.

  Teacher training: SGD (momentum 0.9, weight decay 5e-4), 240 epochs, batch
  64, lr 0.05 (0.01 for MobileNetV2/ShuffleNet) decayed 10x at epochs 150,
  180 and 210, pad-4 crop and flip. GenDD: stage-1 50 epochs, lr 3e-3,
  weight decay 5e-2; stage-2 240 epochs, lr 1e-3, warm-up 50, smooth 0.7,
  token 64, head width 1024 and depth 3, diffusion_batch_mul 30, 100-step
  sampling with CFG 2.
  """
  c = ml_collections.ConfigDict()
  c.stage = 'teacher'
  c.seed = 0
  c.num_devices = 0  # 0: every visible device.
  c.data = ml_collections.ConfigDict(dict(
      name='cifar100', data_dir='', augment='cifar', fold=0, num_folds=1,
      label_fraction=1.0, batch_size=64, eval_batch_size=500))
  c.teacher = teacher_block(teacher)
  c.student = ml_collections.ConfigDict(dict(model=student, init_from=''))
  c.gendd = ml_collections.ConfigDict(dict(
      token_dim=64, width=1024, depth=3, diffusion_batch_mul=30, smooth=0.7,
      beta=1.0, cond_drop_prob=0.2, use_vb=True, noise_schedule='cosine',
      diffusion_steps=1000, target_norm='none', remat=False))
  c.sampler = ml_collections.ConfigDict(dict(
      steps='100', cfg_scale=2.0, temperature=1.0, num_sampling=1,
      clip_x0='none', also_eval_clipped=True))
  c.kd = ml_collections.ConfigDict(dict(
      temperature=4.0, ce_weight=1.0, kd_weight=1.0))
  c.no_decay = ('head', 'cls_projector')
  teacher_lr = 0.01 if teacher in _CIFAR_LOW_LR else 0.05
  sgd = dict(optimizer='sgd', schedule='step',
             decay_epochs=(150, 180, 210), decay_rate=0.1, b1=0.9)
  c.stages = ml_collections.ConfigDict(dict(
      teacher=stage(240, teacher_lr, weight_decay=5e-4, **sgd),
      scratch=stage(240, 0.05, weight_decay=5e-4, **sgd),
      kd=stage(240, 0.05, weight_decay=5e-4, **sgd),
      kl=stage(240, 0.05, weight_decay=5e-4, **sgd),
      stage1=stage(50, 3e-3, weight_decay=5e-2),
      gendd=stage(240, 1e-3, weight_decay=5e-2, warmup_epochs=50,
                  beta2_min=0.95),
      gendd_unsup=stage(240, 1e-3, weight_decay=5e-2, warmup_epochs=50,
                        beta2_min=0.95),
  ))
  c.precompute = precompute_block()
  c.log_every_steps = 200
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 2
  return c


def image_data(name: str, *, image_size: int = 224, augment: str = 'regular',
               batch_size: int = 512, eval_batch_size: int = 500,
               mixup: float = 0.0, cutmix: float = 0.0,
               label_smoothing: float = 0.0, num_classes: int = 0,
               train_split: str = 'train', eval_split: str = 'validation'
               ) -> ml_collections.ConfigDict:
  """A TFDS/builder image dataset read through grain.

  `name` is '<kind>:<name>': 'tfds:imagenet2012', or a dataset made by
  `python -m gendd_jax.build_dataset` ('folder:...', 'imagenet_lt:...',
  'unlabeled:...', 'npz:...'). `augment` is 'regular' (random resized crop
  0.6-1 + flip), 'rand' (plus colour jitter and RandAugment m7), 'cifar' or
  'none'; evaluation uses resize + centre crop. Mixup/CutMix (switch
  probability 0.5) and label smoothing make soft labels. `num_threads`,
  `prefetch` and `num_workers` (worker processes; resume needs the same
  value) size the host pipeline; `stats_batches` caps the pass over the
  training set for target statistics (0: all). `eval_name` evaluates on
  another dataset (needed when the training set has no labels).
  """
  return ml_collections.ConfigDict(dict(
      name=name, eval_name='', data_dir='', train_split=train_split,
      eval_split=eval_split, image_size=image_size, augment=augment,
      num_classes=num_classes, batch_size=batch_size,
      eval_batch_size=eval_batch_size, label_fraction=1.0, mixup=mixup,
      cutmix=cutmix, mix_switch_prob=0.5, label_smoothing=label_smoothing,
      num_threads=16, prefetch=512, num_workers=0, stats_batches=20))
