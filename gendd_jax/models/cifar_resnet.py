"""CIFAR residual networks: ResNet-8...110 / 8x4 / 32x4, the CIFAR
ResNet-50 and the wide ResNets (WRN-16/40-1/2), input `[B, H, W, C]`.

State-dict names match the reference zoo (`models/resnet.py`,
`models/resnetv2.py`, `models/wrn.py`): the shortcut convolution + BN is
`downsample.0/1` in the ResNets, `shortcut.0/1` in the ResNet-50 and
`convShortcut` in the WRN blocks, whose blocks sit under `blockN.layer.i`.
"""

from __future__ import annotations

import jax
from flax import nnx

from gendd_jax.models import layers as cl


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions; 1x1 conv + BN shortcut when the shape changes."""
  expansion = 1

  def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
    cout = width * self.expansion
    self.conv1 = cl.conv(cin, width, 3, stride, rngs=rngs)
    self.bn1 = cl.batch_norm(width, rngs=rngs)
    self.conv2 = cl.conv(width, cout, 3, rngs=rngs)
    self.bn2 = cl.batch_norm(cout, rngs=rngs)
    _init_shortcut(self, cin, cout, stride, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = self.bn2(self.conv2(h), use_running_average=ura)
    return jax.nn.relu(h + _shortcut(self, x, ura))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion."""
  expansion = 4

  def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
    cout = width * self.expansion
    self.conv1 = cl.conv(cin, width, 1, rngs=rngs)
    self.bn1 = cl.batch_norm(width, rngs=rngs)
    self.conv2 = cl.conv(width, width, 3, stride, rngs=rngs)
    self.bn2 = cl.batch_norm(width, rngs=rngs)
    self.conv3 = cl.conv(width, cout, 1, rngs=rngs)
    self.bn3 = cl.batch_norm(cout, rngs=rngs)
    _init_shortcut(self, cin, cout, stride, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=ura))
    h = self.bn3(self.conv3(h), use_running_average=ura)
    return jax.nn.relu(h + _shortcut(self, x, ura))


def _init_shortcut(block, cin, cout, stride, rngs):
  block.has_shortcut = stride != 1 or cin != cout
  if block.has_shortcut:
    block.shortcut_0 = cl.conv(cin, cout, 1, stride, rngs=rngs)
    block.shortcut_1 = cl.batch_norm(cout, rngs=rngs)


def _shortcut(block, x, ura):
  if not block.has_shortcut:
    return x
  return block.shortcut_1(block.shortcut_0(x), use_running_average=ura)


def _stages(cin, widths, counts, strides, block, rngs):
  """`nnx.List`s of blocks per stage, and the output channel count."""
  stages = []
  for width, count, stride in zip(widths, counts, strides):
    blocks = []
    for j in range(count):
      blocks.append(block(cin, width, stride if j == 0 else 1, rngs=rngs))
      cin = width * block.expansion
    stages.append(nnx.List(blocks))
  return stages, cin


class CifarResNet(cl.CifarBackbone):
  """ResNet-(6n+2) of `models/resnet.py`: a 3x3 stem and three stages of
  n basic blocks at strides 1, 2, 2; `widths` = (stem, stage1..3)."""

  TORCH_RENAMES = ((r'shortcut_(\d)', r'downsample.\1'),)

  def __init__(self, depth: int, widths: tuple[int, int, int, int],
               num_classes: int, in_channels: int = 3, *, rngs: nnx.Rngs):
    if (depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {depth}')
    n = (depth - 2) // 6
    self.conv1 = cl.conv(in_channels, widths[0], 3, rngs=rngs)
    self.bn1 = cl.batch_norm(widths[0], rngs=rngs)
    stages, cout = _stages(widths[0], widths[1:], (n, n, n), (1, 2, 2),
                           BasicBlock, rngs)
    self.layer1, self.layer2, self.layer3 = stages
    self.feature_dim = cout
    self.fc = cl.linear(cout, num_classes, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = cl.run_stages((self.layer1, self.layer2, self.layer3), h, train)
    return cl.global_pool(h)


class CifarResNet50(cl.CifarBackbone):
  """ResNet-50 of `models/resnetv2.py`: torchvision's bottleneck stages on
  a 3x3 stride-1 stem without max-pooling (for 32x32 inputs)."""

  TORCH_RENAMES = ((r'shortcut_(\d)', r'shortcut.\1'),)

  def __init__(self, num_classes: int, in_channels: int = 3,
               counts: tuple[int, ...] = (3, 4, 6, 3), *, rngs: nnx.Rngs):
    self.conv1 = cl.conv(in_channels, 64, 3, rngs=rngs)
    self.bn1 = cl.batch_norm(64, rngs=rngs)
    stages, cout = _stages(64, (64, 128, 256, 512), counts, (1, 2, 2, 2),
                           Bottleneck, rngs)
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.feature_dim = cout
    self.fc = cl.linear(cout, num_classes, rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = cl.run_stages((self.layer1, self.layer2, self.layer3, self.layer4),
                      h, train)
    return cl.global_pool(h)


class WideBlock(nnx.Module):
  """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-conv3x3. When the width
  changes, the 1x1 shortcut reads the pre-activated input."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.bn1 = cl.batch_norm(cin, rngs=rngs)
    self.conv1 = cl.conv(cin, cout, 3, stride, rngs=rngs)
    self.bn2 = cl.batch_norm(cout, rngs=rngs)
    self.conv2 = cl.conv(cout, cout, 3, rngs=rngs)
    self.equal_in_out = cin == cout
    if not self.equal_in_out:
      self.conv_shortcut = cl.conv(cin, cout, 1, stride, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    a = jax.nn.relu(self.bn1(x, use_running_average=ura))
    h = jax.nn.relu(self.bn2(self.conv1(a), use_running_average=ura))
    h = self.conv2(h)
    return (x if self.equal_in_out else self.conv_shortcut(a)) + h


class WideResNet(cl.CifarBackbone):
  """WRN-depth-k of `models/wrn.py` (dropout rate 0, as the zoo builds it)."""

  TORCH_RENAMES = ((r'^(block\d)\.', r'\1.layer.'),
                   (r'conv_shortcut', 'convShortcut'))

  def __init__(self, depth: int, widen: int, num_classes: int,
               in_channels: int = 3, *, rngs: nnx.Rngs):
    if (depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4, got {depth}')
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    self.conv1 = cl.conv(in_channels, widths[0], 3, rngs=rngs)
    cin = widths[0]
    stages = []
    for width, stride in zip(widths[1:], (1, 2, 2)):
      blocks = []
      for j in range(n):
        blocks.append(WideBlock(cin, width, stride if j == 0 else 1,
                                rngs=rngs))
        cin = width
      stages.append(nnx.List(blocks))
    self.block1, self.block2, self.block3 = stages
    self.bn1 = cl.batch_norm(cin, rngs=rngs)
    self.feature_dim = cin
    self.fc = cl.linear(cin, num_classes, 'torch_w0', rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = self.conv1(x)
    h = cl.run_stages((self.block1, self.block2, self.block3), h, train)
    h = jax.nn.relu(self.bn1(h, use_running_average=not train))
    return cl.global_pool(h)


_RESNETS = {
    'resnet8': (8, (16, 16, 32, 64)),
    'resnet14': (14, (16, 16, 32, 64)),
    'resnet20': (20, (16, 16, 32, 64)),
    'resnet32': (32, (16, 16, 32, 64)),
    'resnet44': (44, (16, 16, 32, 64)),
    'resnet56': (56, (16, 16, 32, 64)),
    'resnet110': (110, (16, 16, 32, 64)),
    'resnet8x4': (8, (32, 64, 128, 256)),
    'resnet32x4': (32, (32, 64, 128, 256)),
}
_WRNS = {'wrn_16_1': (16, 1), 'wrn_16_2': (16, 2), 'wrn_40_1': (40, 1),
         'wrn_40_2': (40, 2)}


def _resnet(depth, widths):
  return cl.builder(lambda nc, cin, rngs: CifarResNet(
      depth, widths, nc, cin, rngs=rngs))


def _wrn(depth, widen):
  return cl.builder(lambda nc, cin, rngs: WideResNet(
      depth, widen, nc, cin, rngs=rngs))


MODELS = {
    **{name: _resnet(*cfg) for name, cfg in _RESNETS.items()},
    'cifar_resnet50': cl.builder(lambda nc, cin, rngs: CifarResNet50(
        nc, cin, rngs=rngs)),
    **{name: _wrn(*cfg) for name, cfg in _WRNS.items()},
}
