"""CIFAR VGG-8/11/13/16/19 with BatchNorm (the reference's `vgg*_bn`).

Five blocks of 3x3 conv (with bias) + BN + ReLU, the last ReLU of each block
applied outside it; 2x2 max-pooling after blocks 0-2 (after block 3 too for
64x64 inputs, as upstream), then global average pooling and one linear
layer. Each block is an `nnx.List` laid out like the torch `Sequential`
(conv at 3i, BN at 3i+1, ReLU at 3i+2), so keys read `block0.3.weight`.
"""

from __future__ import annotations

import jax
from flax import nnx

from gendd_jax.models import layers as cl

# Conv widths per block.
_CFGS = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
              (512, 512, 512)),
    'vgg19': ((64, 64), (128, 128), (256, 256, 256, 256),
              (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(cin, widths, rngs):
  layers = []
  for w in widths:
    layers += [cl.conv(cin, w, 3, bias=True, rngs=rngs),
               cl.batch_norm(w, rngs=rngs), cl.ReLU()]
    cin = w
  return nnx.List(layers[:-1])


class VGG(cl.CifarBackbone):
  """VGG-BN for 32x32 (or 64x64) images."""

  def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int,
               in_channels: int = 3, *, rngs: nnx.Rngs):
    cin = in_channels
    for i, widths in enumerate(cfg):
      setattr(self, f'block{i}', _block(cin, widths, rngs))
      cin = widths[-1]
    self.feature_dim = cin
    self.fc = cl.linear(cin, num_classes, 'normal', rngs=rngs)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Upstream skips the fourth pooling unless the input is 64 pixels high.
    pool_after = (True, True, True, x.shape[1] == 64, False)
    h = x
    for i, pool in enumerate(pool_after):
      h = jax.nn.relu(cl.run_layers(getattr(self, f'block{i}'), h, train))
      if pool:
        h = nnx.max_pool(h, (2, 2), (2, 2))
    return cl.global_pool(h)


def _vgg(cfg):
  return cl.builder(lambda nc, cin, rngs: VGG(cfg, nc, cin, rngs=rngs))


MODELS = {name: _vgg(cfg) for name, cfg in _CFGS.items()}
