"""Building blocks shared by the convolutional backbones.

Convolutions use torch's padding and BatchNorm torch's defaults, so converted
PyTorch weights give the same numbers. The CIFAR models follow the
RepDistiller/CRD PyTorch zoo that the reference trains its CIFAR-100 teachers
and students with; their torch `nn.Sequential` containers are mirrored by
`nnx.List`s that keep a parameter-free `ReLU` at the same index as the torch
ReLU, so list indices (`conv.3`, `block0.4`) are the torch state-dict indices
without renaming.

Initialisation follows the upstream modules: convolutions are drawn from
N(0, 2 / (k * k * out_channels)) (`kaiming_normal`, fan-out) unless noted,
BatchNorm starts at (1, 0), and linear layers use torch's default uniform
or a small normal, depending on the model.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Normal with variance 2 / fan_out; for a grouped kernel [k, k, in/g, out]
# the fan-out is k * k * out, as in the upstream formula.
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch's default for conv and linear weights: U(-1/sqrt(fan_in), ...).
TORCH_DEFAULT = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                  'uniform')
SMALL_NORMAL = nnx.initializers.normal(0.01)
ZEROS = nnx.initializers.zeros_init()


def conv(cin: int, cout: int, k: int, stride: int = 1, *, groups: int = 1,
         bias: bool = False, init: Callable = KAIMING_FAN_OUT,
         rngs: nnx.Rngs) -> nnx.Conv:
  """A k x k convolution with torch's padding `(k - 1) // 2`."""
  pad = (k - 1) // 2
  return nnx.Conv(cin, cout, (k, k), (stride, stride),
                  padding=((pad, pad), (pad, pad)),
                  feature_group_count=groups, use_bias=bias,
                  kernel_init=init, bias_init=ZEROS, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` whose running variance follows torch's.

  Both normalise a training batch with its biased variance; torch's running
  estimate averages in the unbiased one (times `n / (n - 1)`, `n` the values
  per channel), which matters for small batches and late, small feature
  maps. Evaluation is unchanged.
  """

  def __call__(self, x, use_running_average=None, *, mask=None):
    frozen = (self.use_running_average if use_running_average is None
              else use_running_average)
    if frozen or mask is not None:
      return super().__call__(x, use_running_average, mask=mask)
    before = self.var[...]
    y = super().__call__(x, False)
    # The update just made, m before + (1 - m) v, becomes m before +
    # (1 - m) v n / (n - 1) without a second pass over x: add
    # (1 - m) v / (n - 1) = (after - m before) / (n - 1).
    n = math.prod(x.shape[:-1])
    after = self.var[...]
    self.var[...] = jax.lax.stop_gradient(
        after + (after - self.momentum * before) / max(n - 1, 1))
    return y


def batch_norm(c: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with torch's defaults (momentum 0.1, epsilon 1e-5)."""
  return BatchNorm(c, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                   rngs=rngs)


def _torch_bias(fan_in: int) -> Callable:
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear(cin: int, cout: int, init: str = 'torch', *,
           rngs: nnx.Rngs) -> nnx.Linear:
  """The classifier.

  Args:
    cin: input features.
    cout: classes.
    init: 'torch' (torch's default uniform weight and bias), 'torch_w0'
      (default weight, zero bias) or 'normal' (N(0, 0.01^2), zero bias).
    rngs: random streams.
  """
  kernel, bias = {
      'torch': (TORCH_DEFAULT, _torch_bias(cin)),
      'torch_w0': (TORCH_DEFAULT, ZEROS),
      'normal': (SMALL_NORMAL, ZEROS),
  }[init]
  return nnx.Linear(cin, cout, kernel_init=kernel, bias_init=bias, rngs=rngs)


class ReLU(nnx.Module):
  """Parameter-free ReLU; keeps torch's Sequential indices in an `nnx.List`."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def run_layers(layers: Sequence[nnx.Module], x: jax.Array,
               train: bool) -> jax.Array:
  """Applies a torch-Sequential-like list of convs, BatchNorms and ReLUs."""
  for layer in layers:
    if isinstance(layer, nnx.BatchNorm):
      x = layer(x, use_running_average=not train)
    else:
      x = layer(x)
  return x


def run_stages(stages: Sequence[Sequence[nnx.Module]], x: jax.Array,
               train: bool) -> jax.Array:
  """Applies every block of every stage in order (`block(x, train)`)."""
  for stage in stages:
    for block in stage:
      x = block(x, train)
  return x


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle on `[..., C]`: channel `i * C/g + j` moves to
  `j * g + i`, as torch's view(g, C/g) -> transpose -> flatten does."""
  if groups == 1:
    return x
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def global_pool(x: jax.Array) -> jax.Array:
  """`[B, H, W, C] -> [B, C]` spatial mean.

  Upstream pools with fixed windows (8, 4, 2, ...) sized so that a 32x32
  input leaves a 1x1 map; at that size this is the same operation.
  """
  return jnp.mean(x, axis=(1, 2))


class CifarBackbone(nnx.Module):
  """Common interface: `features` is the input of the linear classifier
  `fc` (the reference's `feat[-1]`); `__call__` returns both."""

  feature_dim: int
  fc: nnx.Linear

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    raise NotImplementedError

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """`x: [B, H, W, C]` -> `(feature [B, D], logits [B, num_classes])`."""
    f = self.features(x, train)
    return f, self.fc(f)


def builder(make: Callable[[int, int, nnx.Rngs], nnx.Module]
            ) -> Callable[..., nnx.Module]:
  """Registry entry for `make(num_classes, in_channels, rngs)`; 32x32
  images by default."""

  def build(num_classes: int, input_shape: tuple, *, rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f'CIFAR models take (H, W, C) images, got input_shape '
                       f'{tuple(input_shape)}')
    return make(num_classes, int(input_shape[-1]), rngs)

  build.default_image_size = 32
  return build
