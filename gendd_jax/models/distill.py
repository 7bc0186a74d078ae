"""Trainable wrappers around a student backbone for the two GenDD stages."""

from __future__ import annotations

import jax
from flax import nnx

from gendd_jax.models.denoiser import DenoiserMLP


class Stage1Model(nnx.Module):
  """Warm-up: student feature -> projection -> frozen teacher classifier.

  The projection is the identity when the widths agree, as in the reference.
  """

  def __init__(self, backbone: nnx.Module, teacher_dim: int, *,
               rngs: nnx.Rngs):
    self.backbone = backbone
    self.has_proj = backbone.feature_dim != teacher_dim
    self.proj = (nnx.Linear(backbone.feature_dim, teacher_dim, rngs=rngs)
                 if self.has_proj else None)

  def __call__(self, x: jax.Array, w_cls: jax.Array, b_cls: jax.Array,
               train: bool = False) -> jax.Array:
    f = self.backbone.features(x, train)
    if self.has_proj:
      f = self.proj(f)
    return f @ w_cls.T + b_cls


class GenDDModel(nnx.Module):
  """Student backbone, condition LayerNorm and the split-token denoiser.

  The backbone's own `fc` is the linear probe (trained on the detached
  feature); `cls_projector` normalises the feature into the condition `z`.
  """

  def __init__(self, backbone: nnx.Module, teacher_dim: int, token_dim: int,
               width: int, depth: int, *, remat: bool = False,
               rngs: nnx.Rngs):
    self.backbone = backbone
    self.cls_projector = nnx.LayerNorm(backbone.feature_dim, epsilon=1e-5,
                                       use_fast_variance=False, rngs=rngs)
    self.head = DenoiserMLP(token_dim, backbone.feature_dim, width, depth,
                            teacher_dim // token_dim, remat=remat, rngs=rngs)

  def student(self, x: jax.Array, train: bool = False
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(z, probe_logits, feature)`; the probe sees a detached feature."""
    f = self.backbone.features(x, train)
    probe = self.backbone.fc(jax.lax.stop_gradient(f))
    return self.cls_projector(f), probe, f
