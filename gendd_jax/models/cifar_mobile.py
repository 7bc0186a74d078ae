"""CIFAR mobile networks: MobileNetV2 (the reference's `mobile_half`),
ShuffleNetV1 (groups 3) and ShuffleNetV2 (1x), input `[B, H, W, C]`.

State-dict names match the reference zoo (`models/mobilenetv2.py`,
`models/ShuffleNetv1.py`, `models/ShuffleNetv2.py`). MobileNetV2's torch
`Sequential`s are `nnx.List`s with parameter-free ReLUs at the torch
indices (`blocks.2.0.conv.3`, `conv1.0`, `conv2.1`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gendd_jax.models import layers as cl


class InvertedResidual(nnx.Module):
  """1x1 expand -> 3x3 depthwise (strided) -> 1x1 project; identity
  shortcut when stride is 1 and the width is unchanged."""

  def __init__(self, cin: int, cout: int, stride: int, expand: int, *,
               rngs: nnx.Rngs):
    mid = cin * expand
    self.use_residual = stride == 1 and cin == cout
    self.conv = nnx.List([
        cl.conv(cin, mid, 1, rngs=rngs), cl.batch_norm(mid, rngs=rngs),
        cl.ReLU(),
        cl.conv(mid, mid, 3, stride, groups=mid, rngs=rngs),
        cl.batch_norm(mid, rngs=rngs), cl.ReLU(),
        cl.conv(mid, cout, 1, rngs=rngs), cl.batch_norm(cout, rngs=rngs),
    ])

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = cl.run_layers(self.conv, x, train)
    return x + h if self.use_residual else h


# (expansion, channels, blocks, first stride); expansion None means T.
_MBV2_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2),
                (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2),
                (None, 320, 1, 1))


class MobileNetV2(cl.CifarBackbone):
  """MobileNetV2 with expansion `T` and width multiplier (the CIFAR
  version: the first expansion-1 block keeps its 1x1 expand conv, and the
  1280-wide head is not scaled down)."""

  def __init__(self, num_classes: int, in_channels: int = 3, expand: int = 6,
               width_mult: float = 0.5, *, rngs: nnx.Rngs):
    cin = int(32 * width_mult)
    self.conv1 = nnx.List([cl.conv(in_channels, cin, 3, 2, rngs=rngs),
                           cl.batch_norm(cin, rngs=rngs), cl.ReLU()])
    stages = []
    for t, c, n, s in _MBV2_STAGES:
      cout = int(c * width_mult)
      blocks = []
      for j in range(n):
        blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1,
                                       expand if t is None else t, rngs=rngs))
        cin = cout
      stages.append(nnx.List(blocks))
    self.blocks = nnx.List(stages)
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = nnx.List([cl.conv(cin, last, 1, rngs=rngs),
                           cl.batch_norm(last, rngs=rngs), cl.ReLU()])
    self.feature_dim = last
    self.fc = cl.linear(last, num_classes, 'normal', rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = cl.run_layers(self.conv1, x, train)
    h = cl.run_stages(self.blocks, h, train)
    return cl.global_pool(cl.run_layers(self.conv2, h, train))


def _avg_pool_3x3_s2(x):
  # torch AvgPool2d(3, 2, padding=1) counts the zero padding.
  return nnx.avg_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)),
                      count_include_pad=True)


class ShuffleV1Block(nnx.Module):
  """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1. Stride 2
  concatenates an average-pooled input; stride 1 adds it."""

  def __init__(self, cin: int, cout: int, stride: int, groups: int, *,
               rngs: nnx.Rngs):
    mid = cout // 4
    # The first block sees the 24-channel stem, which is not grouped.
    self.first_groups = 1 if cin == 24 else groups
    self.stride = stride
    init = cl.TORCH_DEFAULT
    self.conv1 = cl.conv(cin, mid, 1, groups=self.first_groups, init=init,
                         rngs=rngs)
    self.bn1 = cl.batch_norm(mid, rngs=rngs)
    self.conv2 = cl.conv(mid, mid, 3, stride, groups=mid, init=init,
                         rngs=rngs)
    self.bn2 = cl.batch_norm(mid, rngs=rngs)
    self.conv3 = cl.conv(mid, cout, 1, groups=groups, init=init, rngs=rngs)
    self.bn3 = cl.batch_norm(cout, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = cl.channel_shuffle(h, self.first_groups)
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=ura))
    h = self.bn3(self.conv3(h), use_running_average=ura)
    if self.stride == 2:
      return jax.nn.relu(jnp.concatenate([h, _avg_pool_3x3_s2(x)], -1))
    return jax.nn.relu(h + x)


class ShuffleNetV1(cl.CifarBackbone):
  """ShuffleNetV1 for CIFAR: 1x1 stem, three stages that each halve the
  resolution in their first block."""

  def __init__(self, num_classes: int, in_channels: int = 3,
               widths: tuple[int, ...] = (240, 480, 960),
               counts: tuple[int, ...] = (4, 8, 4), groups: int = 3, *,
               rngs: nnx.Rngs):
    init = cl.TORCH_DEFAULT
    self.conv1 = cl.conv(in_channels, 24, 1, init=init, rngs=rngs)
    self.bn1 = cl.batch_norm(24, rngs=rngs)
    cin = 24
    stages = []
    for width, count in zip(widths, counts):
      blocks = []
      for j in range(count):
        # The strided block's output is concatenated with its input.
        out = width - cin if j == 0 else width
        blocks.append(ShuffleV1Block(cin, out, 2 if j == 0 else 1, groups,
                                     rngs=rngs))
        cin = width
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3 = stages
    self.feature_dim = cin
    self.fc = cl.linear(cin, num_classes, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = cl.run_stages((self.layer1, self.layer2, self.layer3), h, train)
    return cl.global_pool(h)


class ShuffleV2Block(nnx.Module):
  """Split the channels in halves; 1x1 -> 3x3 depthwise -> 1x1 on the
  second half; concatenate and shuffle."""

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    half = c // 2
    init = cl.TORCH_DEFAULT
    self.conv1 = cl.conv(half, half, 1, init=init, rngs=rngs)
    self.bn1 = cl.batch_norm(half, rngs=rngs)
    self.conv2 = cl.conv(half, half, 3, groups=half, init=init, rngs=rngs)
    self.bn2 = cl.batch_norm(half, rngs=rngs)
    self.conv3 = cl.conv(half, half, 1, init=init, rngs=rngs)
    self.bn3 = cl.batch_norm(half, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    h = jax.nn.relu(self.bn1(self.conv1(x2), use_running_average=ura))
    h = self.bn2(self.conv2(h), use_running_average=ura)
    h = jax.nn.relu(self.bn3(self.conv3(h), use_running_average=ura))
    return cl.channel_shuffle(jnp.concatenate([x1, h], -1), 2)


class ShuffleV2Down(nnx.Module):
  """Stride-2 unit: depthwise -> 1x1 on the left; 1x1 -> depthwise -> 1x1
  on the right; concatenate and shuffle."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    mid = cout // 2
    init = cl.TORCH_DEFAULT
    self.conv1 = cl.conv(cin, cin, 3, 2, groups=cin, init=init, rngs=rngs)
    self.bn1 = cl.batch_norm(cin, rngs=rngs)
    self.conv2 = cl.conv(cin, mid, 1, init=init, rngs=rngs)
    self.bn2 = cl.batch_norm(mid, rngs=rngs)
    self.conv3 = cl.conv(cin, mid, 1, init=init, rngs=rngs)
    self.bn3 = cl.batch_norm(mid, rngs=rngs)
    self.conv4 = cl.conv(mid, mid, 3, 2, groups=mid, init=init, rngs=rngs)
    self.bn4 = cl.batch_norm(mid, rngs=rngs)
    self.conv5 = cl.conv(mid, mid, 1, init=init, rngs=rngs)
    self.bn5 = cl.batch_norm(mid, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    left = self.bn1(self.conv1(x), use_running_average=ura)
    left = jax.nn.relu(self.bn2(self.conv2(left), use_running_average=ura))
    right = jax.nn.relu(self.bn3(self.conv3(x), use_running_average=ura))
    right = self.bn4(self.conv4(right), use_running_average=ura)
    right = jax.nn.relu(self.bn5(self.conv5(right), use_running_average=ura))
    return cl.channel_shuffle(jnp.concatenate([left, right], -1), 2)


class ShuffleNetV2(cl.CifarBackbone):
  """ShuffleNetV2 for CIFAR: 1x1 stem, three stages of one stride-2 unit
  and `counts` basic units, a 1x1 conv to `last` channels."""

  def __init__(self, num_classes: int, in_channels: int = 3,
               widths: tuple[int, ...] = (116, 232, 464),
               counts: tuple[int, ...] = (3, 7, 3), last: int = 1024, *,
               rngs: nnx.Rngs):
    init = cl.TORCH_DEFAULT
    self.conv1 = cl.conv(in_channels, 24, 1, init=init, rngs=rngs)
    self.bn1 = cl.batch_norm(24, rngs=rngs)
    cin = 24
    stages = []
    for width, count in zip(widths, counts):
      blocks = [ShuffleV2Down(cin, width, rngs=rngs)]
      blocks += [ShuffleV2Block(width, rngs=rngs) for _ in range(count)]
      stages.append(nnx.List(blocks))
      cin = width
    self.layer1, self.layer2, self.layer3 = stages
    self.conv2 = cl.conv(cin, last, 1, init=init, rngs=rngs)
    self.bn2 = cl.batch_norm(last, rngs=rngs)
    self.feature_dim = last
    self.fc = cl.linear(last, num_classes, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = cl.run_stages((self.layer1, self.layer2, self.layer3), h, train)
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=ura))
    return cl.global_pool(h)


MODELS = {
    'mobilenetv2': cl.builder(lambda nc, cin, rngs: MobileNetV2(
        nc, cin, rngs=rngs)),
    'shufflev1': cl.builder(lambda nc, cin, rngs: ShuffleNetV1(
        nc, cin, rngs=rngs)),
    'shufflev2': cl.builder(lambda nc, cin, rngs: ShuffleNetV2(
        nc, cin, rngs=rngs)),
}
