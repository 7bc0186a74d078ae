"""ResNet-18/34/50/101 and ResNeXt for ImageNet-size inputs (NHWC).

The layout is torchvision's (and timm's, which uses the same names): ResNeXt
is the Bottleneck network with a grouped 3x3 convolution of
`width = int(planes * width_per_group / 64) * groups` channels, so
`resnext101_32x4d` has 32 groups of 4 channels in its first stage.

Attribute paths follow torchvision's state-dict names (`layer1.0.conv1`, with
`downsample.0`/`downsample.1` as `downsample_0`/`downsample_1`), and the
paddings are explicit so a converted torch model gives the same numbers.
BatchNorm uses torch's defaults (momentum 0.1, i.e. 0.9 here; epsilon 1e-5);
its statistics are Flax `BatchStat`s, updated only when `train=True`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gendd_jax.models import layers


def _conv(cin, cout, k, stride=1, groups=1, *, rngs):
  return layers.conv(cin, cout, k, stride, groups=groups, rngs=rngs)


_bn = layers.batch_norm


class _Block(nnx.Module):
  """Shared shortcut: identity, or strided 1x1 conv + BN if shapes change."""

  def _init_shortcut(self, cin, cout, stride, *, rngs):
    self.has_downsample = stride != 1 or cin != cout
    if self.has_downsample:
      self.downsample_0 = _conv(cin, cout, 1, stride, rngs=rngs)
      self.downsample_1 = _bn(cout, rngs=rngs)

  def _add_shortcut(self, h, x, ura):
    if self.has_downsample:
      x = self.downsample_1(self.downsample_0(x), use_running_average=ura)
    return jax.nn.relu(h + x)


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""
  expansion = 1

  def __init__(self, cin, planes, stride, groups=1, width_per_group=64, *,
               rngs):
    del groups, width_per_group  # `ResNet` checks they are 1 and 64.
    cout = planes * self.expansion
    self.conv1 = _conv(cin, planes, 3, stride, rngs=rngs)
    self.bn1 = _bn(planes, rngs=rngs)
    self.conv2 = _conv(planes, cout, 3, rngs=rngs)
    self.bn2 = _bn(cout, rngs=rngs)
    self._init_shortcut(cin, cout, stride, rngs=rngs)

  def __call__(self, x, train: bool):
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = self.bn2(self.conv2(h), use_running_average=ura)
    return self._add_shortcut(h, x, ura)


class Bottleneck(_Block):
  """1x1 -> 3x3 (strided, as torchvision's v1.5) -> 1x1 (ResNet-50/101).

  With `groups > 1` the 3x3 convolution is grouped (ResNeXt); its width is
  `int(planes * width_per_group / 64) * groups`, the output `4 * planes`.
  """
  expansion = 4

  def __init__(self, cin, planes, stride, groups=1, width_per_group=64, *,
               rngs):
    width = int(planes * (width_per_group / 64.0)) * groups
    cout = planes * self.expansion
    self.conv1 = _conv(cin, width, 1, rngs=rngs)
    self.bn1 = _bn(width, rngs=rngs)
    self.conv2 = _conv(width, width, 3, stride, groups, rngs=rngs)
    self.bn2 = _bn(width, rngs=rngs)
    self.conv3 = _conv(width, cout, 1, rngs=rngs)
    self.bn3 = _bn(cout, rngs=rngs)
    self._init_shortcut(cin, cout, stride, rngs=rngs)

  def __call__(self, x, train: bool):
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=ura))
    h = self.bn3(self.conv3(h), use_running_average=ura)
    return self._add_shortcut(h, x, ura)


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nnx.Module):
  """ResNet returning `(pooled feature, logits)`; input `[B, H, W, C]`."""

  TORCH_RENAMES = ((r'downsample_(\d)', r'downsample.\1'),)

  def __init__(self, depth: int, num_classes: int, in_channels: int = 3,
               groups: int = 1, width_per_group: int = 64,
               blocks: int = 0, *, rngs: nnx.Rngs):
    if depth not in _DEPTHS:
      raise ValueError(f'no ResNet-{depth}; available: {sorted(_DEPTHS)}')
    block, counts = _DEPTHS[depth]
    if blocks < 0:
      raise ValueError(f'blocks must be >= 0 (0: as ResNet-{depth}), got '
                       f'{blocks}')
    if blocks:  # A shallower network of the same blocks and widths.
      counts = (blocks,) * len(counts)
    if block is BasicBlock and (groups, width_per_group) != (1, 64):
      raise ValueError(f'ResNet-{depth} has basic blocks, which take no '
                       'groups or width_per_group')
    self.conv1 = nnx.Conv(in_channels, 64, (7, 7), (2, 2),
                          padding=((3, 3), (3, 3)), use_bias=False,
                          kernel_init=layers.KAIMING_FAN_OUT, rngs=rngs)
    self.bn1 = _bn(64, rngs=rngs)
    cin = 64
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
      blocks = []
      for j in range(count):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(cin, planes, stride, groups, width_per_group,
                            rngs=rngs))
        cin = planes * block.expansion
      setattr(self, f'layer{i + 1}', nnx.List(blocks))
    self.feature_dim = cin
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)),
                constant_values=-jnp.inf)
    h = nnx.max_pool(h, (3, 3), (2, 2))
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
      for blk in getattr(self, name):
        h = blk(h, train)
    return jnp.mean(h, axis=(1, 2))

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    f = self.features(x, train)
    return f, self.fc(f)


def _builder(depth, groups=1, width_per_group=64):
  def build(num_classes: int, input_shape: tuple, *, rngs: nnx.Rngs,
            blocks: int = 0):
    """`blocks > 0` keeps that many blocks per stage (the `:tiny` configs'
    smoke-test depth); 0 builds the named network."""
    return ResNet(depth, num_classes, in_channels=int(input_shape[-1]),
                  groups=groups, width_per_group=width_per_group,
                  blocks=blocks, rngs=rngs)
  return build


# name -> (depth, groups, width_per_group), as torchvision/timm name them.
_VARIANTS = {
    'resnet18': (18, 1, 64),
    'resnet34': (34, 1, 64),
    'resnet50': (50, 1, 64),
    'resnet101': (101, 1, 64),
    'resnext50_32x4d': (50, 32, 4),
    'resnext101_32x4d': (101, 32, 4),
    'resnext101_32x8d': (101, 32, 8),
}

MODELS = {name: _builder(*v) for name, v in _VARIANTS.items()}
