"""Torch twins of the ImageNet convnets, with the upstream state-dict names.

`ResNet` has torchvision's (and timm's) key names (`conv1`, `layer1.0.conv2`,
`layer2.0.downsample.0`, `fc`), ResNeXt being the Bottleneck network with a
grouped 3x3 convolution; `MobileNetV1` has the names of the mdistiller /
ReviewKD / CRD student (`model.0.0`, `model.1.3`, `fc`). Forward passes
return logits. Tests only.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual shortcut."""
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, groups: int = 1,
               width_per_group: int = 64):
    super().__init__()
    assert groups == 1 and width_per_group == 64
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = _bn(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = _bn(planes)
    self.downsample = _shortcut(cin, planes, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    return torch.relu(h + (x if self.downsample is None
                           else self.downsample(x)))


class Bottleneck(nn.Module):
  """1x1 -> grouped, strided 3x3 -> 1x1 expansion by 4."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, groups: int = 1,
               width_per_group: int = 64):
    super().__init__()
    width = int(planes * (width_per_group / 64.0)) * groups
    cout = planes * self.expansion
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = _bn(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups,
                           bias=False)
    self.bn2 = _bn(width)
    self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
    self.bn3 = _bn(cout)
    self.downsample = _shortcut(cin, cout, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(self.bn1(self.conv1(x)))
    h = torch.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    return torch.relu(h + (x if self.downsample is None
                           else self.downsample(x)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))


_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


class ResNet(nn.Module):
  """torchvision-layout ResNet / ResNeXt."""

  def __init__(self, depth: int, num_classes: int, groups: int = 1,
               width_per_group: int = 64):
    super().__init__()
    block, counts = _DEPTHS[depth]
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = _bn(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
      blocks = []
      for j in range(count):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(cin, planes, stride, groups, width_per_group))
        cin = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
    return self.fc(torch.flatten(self.avgpool(h), 1))


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                       _bn(cout), nn.ReLU())


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
  return nn.Sequential(
      nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), _bn(cin),
      nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), _bn(cout), nn.ReLU())


_MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
                     (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
  """The distillation literature's MobileNetV1, all layers in `model`.

  `pool=7` is upstream's fixed 7x7 average pool (224x224 inputs); `pool=None`
  pools globally, for smaller test images.
  """

  def __init__(self, num_classes: int = 1000, pool: int | None = 7):
    super().__init__()
    layers = [_conv_bn(3, 32, 2)]
    cin = 32
    for cout, stride in _MOBILENET_BLOCKS:
      layers.append(_conv_dw(cin, cout, stride))
      cin = cout
    layers.append(nn.AvgPool2d(pool) if pool else nn.AdaptiveAvgPool2d(1))
    self.model = nn.Sequential(*layers)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.model(x).reshape(-1, 1024))
