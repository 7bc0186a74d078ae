"""Parameters and FLOPs of the registered models.

    python -m gendd_jax.cli.zoo                      # every model
    python -m gendd_jax.cli.zoo resnet50 resnet8x4   # some of them
    python -m gendd_jax.cli.zoo --list

Counts are for the eval-mode forward of one image, traced from abstract
shapes (no weights are allocated). GMACs are the multiply-accumulates of
every convolution and matrix product in the traced program (attention
included), the convention behind the usual "FLOPs" figures (e.g. 4.1G for
ResNet-50, 17.6G for BEiT-B/16); element-wise work is not counted. `XLA
GFLOPs` is XLA's own cost analysis of the same program, which counts a
multiply-add as two operations and includes element-wise work.
"""

from __future__ import annotations

from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from gendd_jax import errors
from gendd_jax import flops
from gendd_jax import models
from gendd_jax.cli import common

_LIST = flags.DEFINE_bool('list', False, 'Only list the registered names.')
flags.declare_key_flag('num_classes')
flags.declare_key_flag('image_size')


def default_image_size(name: str) -> int:
  return getattr(models.REGISTRY[name], 'default_image_size', 224)


def default_classes(name: str) -> int:
  return 100 if default_image_size(name) == 32 else 1000


def count_macs(jaxpr) -> int:
  """Multiply-accumulates of all convolutions and dot products in `jaxpr`
  (nested jaxprs included)."""
  return flops.matmul_flops(jaxpr) // 2


def summarise(name: str, num_classes: int | None = None,
              image_size: int | None = None, **settings) -> dict:
  """`{model, params, flops, gmacs, feature_dim, ...}` for one model."""
  num_classes = num_classes or default_classes(name)
  size = image_size or default_image_size(name)
  shape = (size, size, 3)
  if name == 'mlp':
    settings.setdefault('hidden', (256, 64))
  abstract = nnx.eval_shape(lambda: models.create_backbone(
      name, num_classes=num_classes, input_shape=shape, rngs=nnx.Rngs(0),
      **settings))
  graphdef, state = nnx.split(abstract)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, train=False)

  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  macs = count_macs(jax.make_jaxpr(forward)(state, x).jaxpr)
  cost = jax.jit(forward).lower(state, x).cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per device.
    cost = cost[0]
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  return dict(model=name, params=models.param_count(abstract), macs=macs,
              gmacs=macs / 1e9, xla_gflops=flops / 1e9,
              feature_dim=int(abstract.feature_dim), num_classes=num_classes,
              image_size=size)


def main(argv: list[str]) -> int:
  """`argv[1:]`: the models (default: all)."""
  if _LIST.value:
    print('\n'.join(models.BACKBONES))
    return 0
  names = argv[1:] or [n for n in models.BACKBONES if n != 'mlp']
  unknown = [n for n in names if n not in models.REGISTRY]
  if unknown:
    errors.fail(f'unknown model(s) {unknown}; see --list')
  print(f'{"model":28s} {"input":>7s} {"classes":>7s} {"feature":>7s} '
        f'{"params":>13s} {"GMACs":>8s} {"XLA GFLOPs":>10s}')
  for name in names:
    s = summarise(name, common.NUM_CLASSES.value, common.IMAGE_SIZE.value)
    print(f'{name:28s} {s["image_size"]:>7d} {s["num_classes"]:>7d} '
          f'{s["feature_dim"]:>7d} {s["params"]:>13,d} {s["gmacs"]:>8.3f} '
          f'{s["xla_gflops"]:>10.3f}',
          flush=True)
  return 0


def entry() -> None:
  """The `gendd-zoo` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
