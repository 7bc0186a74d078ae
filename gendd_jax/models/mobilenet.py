"""MobileNetV1, the ImageNet student of the distillation literature (NHWC).

The layout is the one CRD, ReviewKD and DKD (mdistiller) train as the
"MobileNet" student of a ResNet-50 teacher: a strided 3x3 stem of 32
channels, then 13 depthwise-separable blocks (depthwise 3x3 + BN + ReLU,
pointwise 1x1 + BN + ReLU) up to 1024 channels, average pooling and a linear
classifier. Its torch state dict keeps everything in one `model` Sequential:
the stem is `model.0.{0,1}` (conv, BN) and block `i` is `model.i.{0,1,3,4}`
(depthwise conv, BN, pointwise conv, BN); here they are `model[i]` with the
named attributes of `TORCH_RENAMES`. Upstream pools with a fixed 7x7 window,
which at 224x224 is the global average used here (any input size works).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gendd_jax.models import layers


def _conv(cin, cout, k, stride=1, groups=1, *, rngs):
  return layers.conv(cin, cout, k, stride, groups=groups, rngs=rngs)


_bn = layers.batch_norm

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2),
           (1024, 1))


class ConvBN(nnx.Module):
  """3x3 convolution + BN + ReLU (the stem)."""

  def __init__(self, cin, cout, stride, *, rngs):
    self.conv = _conv(cin, cout, 3, stride, rngs=rngs)
    self.bn = _bn(cout, rngs=rngs)

  def __call__(self, x, train: bool):
    return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class DepthwiseSeparable(nnx.Module):
  """Depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU."""

  def __init__(self, cin, cout, stride, *, rngs):
    self.conv_dw = _conv(cin, cin, 3, stride, groups=cin, rngs=rngs)
    self.bn_dw = _bn(cin, rngs=rngs)
    self.conv_pw = _conv(cin, cout, 1, 1, rngs=rngs)
    self.bn_pw = _bn(cout, rngs=rngs)

  def __call__(self, x, train: bool):
    ura = not train
    h = jax.nn.relu(self.bn_dw(self.conv_dw(x), use_running_average=ura))
    return jax.nn.relu(self.bn_pw(self.conv_pw(h), use_running_average=ura))


class MobileNetV1(nnx.Module):
  """MobileNetV1 returning `(pooled feature [B, 1024], logits)`."""

  # Positions of the layers inside upstream's per-block Sequentials (the
  # ReLUs, without parameters, sit at 2 and 5).
  TORCH_RENAMES = ((r'\.(conv|conv_dw)$', '.0'), (r'\.(bn|bn_dw)$', '.1'),
                   (r'\.conv_pw$', '.3'), (r'\.bn_pw$', '.4'))

  def __init__(self, num_classes: int, in_channels: int = 3,
               blocks: int = 0, *, rngs: nnx.Rngs):
    if blocks not in (0, 1):
      raise ValueError(f'blocks must be 0 (all 13) or 1 (one per width), '
                       f'got {blocks}')
    # blocks=1: the first block of each width (the strided ones and the
    # first), a shallower network with the same widths and feature size.
    kept = [b for i, b in enumerate(_BLOCKS)
            if not blocks or i == 0 or b[0] != _BLOCKS[i - 1][0]]
    layers_ = [ConvBN(in_channels, 32, 2, rngs=rngs)]
    cin = 32
    for cout, stride in kept:
      layers_.append(DepthwiseSeparable(cin, cout, stride, rngs=rngs))
      cin = cout
    self.model = nnx.List(layers_)
    self.feature_dim = cin
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`x: [B, H, W, C]` -> pooled feature `[B, 1024]`."""
    for layer in self.model:
      x = layer(x, train)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    f = self.features(x, train)
    return f, self.fc(f)


def mobilenet_v1(num_classes: int, input_shape: tuple, *,
                 rngs: nnx.Rngs, blocks: int = 0) -> MobileNetV1:
  """Builds MobileNetV1 for `input_shape = (H, W, C)` images; `blocks=1`
  keeps one block per width (the `:tiny` configs' smoke-test depth)."""
  return MobileNetV1(num_classes, in_channels=int(input_shape[-1]),
                     blocks=blocks, rngs=rngs)


MODELS = {'mobilenet_v1': mobilenet_v1}
