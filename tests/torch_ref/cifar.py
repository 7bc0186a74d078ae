"""PyTorch twins of the CIFAR model zoo, for conversion-parity tests.

Written with `torch.nn` to reproduce the reference zoo's computations and
state-dict keys (RepDistiller/CRD layout); `forward` returns logits and
`features` the input of the classifier `fc`. `MODELS` maps the gendd_jax
registry names to constructors taking `num_classes`.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _conv(cin, cout, k, stride=1, groups=1, bias=False):
  return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                   bias=bias)


class _Net(nn.Module):
  """`forward` = `fc(features(x))`."""

  def forward(self, x):
    return self.fc(self.features(x))


# ---------------------------------------------------------------- ResNets.


class _Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride, shortcut_name):
    super().__init__()
    self.conv1 = _conv(cin, width, 3, stride)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = _conv(width, width, 3)
    self.bn2 = nn.BatchNorm2d(width)
    self._sc = shortcut_name
    if stride != 1 or cin != width:
      setattr(self, shortcut_name, nn.Sequential(
          _conv(cin, width, 1, stride), nn.BatchNorm2d(width)))

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    sc = getattr(self, self._sc, None)
    return F.relu(h + (x if sc is None else sc(x)))


class _Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride, shortcut_name):
    super().__init__()
    cout = 4 * width
    self.conv1 = _conv(cin, width, 1)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = _conv(width, width, 3, stride)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = _conv(width, cout, 1)
    self.bn3 = nn.BatchNorm2d(cout)
    self._sc = shortcut_name
    if stride != 1 or cin != cout:
      setattr(self, shortcut_name, nn.Sequential(
          _conv(cin, cout, 1, stride), nn.BatchNorm2d(cout)))

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = F.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    sc = getattr(self, self._sc, None)
    return F.relu(h + (x if sc is None else sc(x)))


def _stage(block, cin, width, count, stride, shortcut_name):
  blocks = []
  for j in range(count):
    blocks.append(block(cin, width, stride if j == 0 else 1, shortcut_name))
    cin = width * block.expansion
  return nn.Sequential(*blocks), cin


class ResNet(_Net):
  """`models/resnet.py` ResNet-(6n+2) with basic blocks."""

  def __init__(self, depth, widths, num_classes):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = _conv(3, widths[0], 3)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    self.layer1, cin = _stage(_Basic, cin, widths[1], n, 1, 'downsample')
    self.layer2, cin = _stage(_Basic, cin, widths[2], n, 2, 'downsample')
    self.layer3, cin = _stage(_Basic, cin, widths[3], n, 2, 'downsample')
    self.fc = nn.Linear(cin, num_classes)

  def features(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.layer3(self.layer2(self.layer1(h)))
    return F.avg_pool2d(h, 8).flatten(1)


class ResNet50(_Net):
  """`models/resnetv2.py` ResNet-50."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = _conv(3, 64, 3)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (w, n, s) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3),
                                      (1, 2, 2, 2))):
      stage, cin = _stage(_Bottleneck, cin, w, n, s, 'shortcut')
      setattr(self, f'layer{i + 1}', stage)
    self.fc = nn.Linear(cin, num_classes)

  def features(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
    return F.adaptive_avg_pool2d(h, 1).flatten(1)


class _WideBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = _conv(cin, cout, 3, stride)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = _conv(cout, cout, 3)
    self.equal = cin == cout
    if not self.equal:
      self.convShortcut = _conv(cin, cout, 1, stride)

  def forward(self, x):
    a = F.relu(self.bn1(x))
    h = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return (x if self.equal else self.convShortcut(a)) + h


class _WideStage(nn.Module):

  def __init__(self, cin, cout, n, stride):
    super().__init__()
    self.layer = nn.Sequential(*[
        _WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
        for j in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(_Net):
  """`models/wrn.py` WRN-depth-k."""

  def __init__(self, depth, widen, num_classes):
    super().__init__()
    n = (depth - 4) // 6
    w = (16, 16 * widen, 32 * widen, 64 * widen)
    self.conv1 = _conv(3, w[0], 3)
    self.block1 = _WideStage(w[0], w[1], n, 1)
    self.block2 = _WideStage(w[1], w[2], n, 2)
    self.block3 = _WideStage(w[2], w[3], n, 2)
    self.bn1 = nn.BatchNorm2d(w[3])
    self.fc = nn.Linear(w[3], num_classes)

  def features(self, x):
    h = self.block3(self.block2(self.block1(self.conv1(x))))
    return F.avg_pool2d(F.relu(self.bn1(h)), 8).flatten(1)


# -------------------------------------------------------------------- VGG.

_VGG = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(_Net):
  """`models/vgg.py` VGG-BN."""

  def __init__(self, depth, num_classes):
    super().__init__()
    cin = 3
    for i, widths in enumerate(_VGG[depth]):
      layers = []
      for w in widths:
        layers += [_conv(cin, w, 3, bias=True), nn.BatchNorm2d(w),
                   nn.ReLU()]
        cin = w
      setattr(self, f'block{i}', nn.Sequential(*layers[:-1]))
    self.fc = nn.Linear(cin, num_classes)

  def features(self, x):
    big = x.shape[2] == 64
    h = x
    for i in range(5):
      h = F.relu(getattr(self, f'block{i}')(h))
      if i < 3 or (i == 3 and big):
        h = F.max_pool2d(h, 2, 2)
    return F.adaptive_avg_pool2d(h, 1).flatten(1)


# ------------------------------------------------------------ MobileNetV2.


class _InvRes(nn.Module):

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    mid = cin * t
    self.res = stride == 1 and cin == cout
    self.conv = nn.Sequential(
        _conv(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
        _conv(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid),
        nn.ReLU(), _conv(mid, cout, 1), nn.BatchNorm2d(cout))

  def forward(self, x):
    return x + self.conv(x) if self.res else self.conv(x)


class MobileNetV2(_Net):
  """`models/mobilenetv2.py` `mobile_half` (T = 6, width 0.5)."""

  def __init__(self, num_classes, t=6, wm=0.5):
    super().__init__()
    cin = int(32 * wm)
    self.conv1 = nn.Sequential(_conv(3, cin, 3, 2), nn.BatchNorm2d(cin),
                               nn.ReLU())
    self.blocks = nn.ModuleList()
    for e, c, n, s in ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2),
                       (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2),
                       (t, 320, 1, 1)):
      cout = int(c * wm)
      stage = []
      for j in range(n):
        stage.append(_InvRes(cin, cout, s if j == 0 else 1, e))
        cin = cout
      self.blocks.append(nn.Sequential(*stage))
    self.conv2 = nn.Sequential(_conv(cin, 1280, 1), nn.BatchNorm2d(1280),
                               nn.ReLU())
    self.fc = nn.Linear(1280, num_classes)

  def features(self, x):
    h = self.conv1(x)
    for stage in self.blocks:
      h = stage(h)
    return F.avg_pool2d(self.conv2(h), 2, ceil_mode=True).flatten(1)


# ------------------------------------------------------------ ShuffleNets.


def _shuffle(x, g):
  n, c, h, w = x.shape
  return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class _V1Block(nn.Module):

  def __init__(self, cin, cout, stride, groups):
    super().__init__()
    mid = cout // 4
    self.g = 1 if cin == 24 else groups
    self.stride = stride
    self.conv1 = _conv(cin, mid, 1, groups=self.g)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = _conv(mid, mid, 3, stride, groups=mid)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = _conv(mid, cout, 1, groups=groups)
    self.bn3 = nn.BatchNorm2d(cout)

  def forward(self, x):
    h = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
    h = F.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    if self.stride == 2:
      return F.relu(torch.cat([h, F.avg_pool2d(x, 3, 2, 1)], 1))
    return F.relu(h + x)


class ShuffleV1(_Net):
  """`models/ShuffleNetv1.py` with groups 3."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = _conv(3, 24, 1)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for i, (w, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
      blocks = []
      for j in range(n):
        blocks.append(_V1Block(cin, w - cin if j == 0 else w,
                               2 if j == 0 else 1, 3))
        cin = w
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def features(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.layer3(self.layer2(self.layer1(h)))
    return F.avg_pool2d(h, 4).flatten(1)


class _V2Block(nn.Module):

  def __init__(self, c):
    super().__init__()
    c //= 2
    self.conv1 = _conv(c, c, 1)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = _conv(c, c, 3, groups=c)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = _conv(c, c, 1)
    self.bn3 = nn.BatchNorm2d(c)

  def forward(self, x):
    c = x.shape[1] // 2
    x1, x2 = x[:, :c], x[:, c:]
    h = F.relu(self.bn1(self.conv1(x2)))
    h = self.bn2(self.conv2(h))
    h = F.relu(self.bn3(self.conv3(h)))
    return _shuffle(torch.cat([x1, h], 1), 2)


class _V2Down(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1 = _conv(cin, cin, 3, 2, groups=cin)
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv2 = _conv(cin, mid, 1)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = _conv(cin, mid, 1)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = _conv(mid, mid, 3, 2, groups=mid)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = _conv(mid, mid, 1)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    a = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    b = F.relu(self.bn3(self.conv3(x)))
    b = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(b)))))
    return _shuffle(torch.cat([a, b], 1), 2)


class ShuffleV2(_Net):
  """`models/ShuffleNetv2.py` at net size 1."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = _conv(3, 24, 1)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for i, (w, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
      blocks = [_V2Down(cin, w)] + [_V2Block(w) for _ in range(n)]
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
      cin = w
    self.conv2 = _conv(cin, 1024, 1)
    self.bn2 = nn.BatchNorm2d(1024)
    self.fc = nn.Linear(1024, num_classes)

  def features(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.layer3(self.layer2(self.layer1(h)))
    return F.avg_pool2d(F.relu(self.bn2(self.conv2(h))), 4).flatten(1)


_RESNETS = {
    'resnet8': (8, (16, 16, 32, 64)), 'resnet14': (14, (16, 16, 32, 64)),
    'resnet20': (20, (16, 16, 32, 64)), 'resnet32': (32, (16, 16, 32, 64)),
    'resnet44': (44, (16, 16, 32, 64)), 'resnet56': (56, (16, 16, 32, 64)),
    'resnet110': (110, (16, 16, 32, 64)),
    'resnet8x4': (8, (32, 64, 128, 256)),
    'resnet32x4': (32, (32, 64, 128, 256)),
}


def _bind(cls, *args):
  return lambda num_classes: cls(*args, num_classes)


MODELS = {
    **{k: _bind(ResNet, *v) for k, v in _RESNETS.items()},
    'cifar_resnet50': ResNet50,
    **{f'wrn_{d}_{w}': _bind(WideResNet, d, w)
       for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f'vgg{d}': _bind(VGG, d) for d in _VGG},
    'mobilenetv2': MobileNetV2,
    'shufflev1': ShuffleV1,
    'shufflev2': ShuffleV2,
}
