"""BEiT-v2 ViT-B/16 and ViT-L/16 classifiers (ImageNet fine-tuned layout).

The fine-tuning architecture of BEiT v2 (Peng et al., 2022) as timm's
`beitv2_base_patch16_224` / `beitv2_large_patch16_224` define it: a 16x16
patch-embedding convolution, a cls token and no absolute position embedding;
pre-norm blocks (LayerNorm eps 1e-6) whose attention adds a learned relative
position bias of its own (`relative_position_bias_table`, with three extra
rows for the cls-to-token, token-to-cls and cls-to-cls pairs), a bias-free
`qkv` projection plus separate `q_bias` / `v_bias` (the key bias is zero),
layer scale `gamma_1` / `gamma_2`, and an exact-erf GELU MLP of ratio 4.
The head averages the patch tokens (cls excluded), normalises them with
`fc_norm` and classifies; the feature is the `fc_norm` output (768 / 1024).

Parameter names and shapes equal timm's state dict, which is also the
layout of the unilm `beit2` fine-tuned checkpoints (these additionally hold
the `relative_position_index` buffers, which the converter skips); only the
classifier, upstream `head`, is `fc` here. BEiT-v2 *pre-training*
checkpoints (a shared `rel_pos_bias.relative_position_bias_table` and no
`fc_norm`/`head`) are not classifiers and do not load.

The relative position bias is built for the patch grid of the `input_shape`
the model is created with, so a model built for 384x384 images has a larger
table than a 224 checkpoint holds; timm interpolates the table in that case,
which this module does not. Dropout, attention dropout and stochastic depth
(drop path) are left out: the model serves as a frozen teacher and its eval
forward pass has none of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_EPS = 1e-6
_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)


@functools.lru_cache(maxsize=None)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """Index into the bias table for every (query, key) token pair.

  Token 0 is the cls token, then the patches in row-major order. A patch
  pair `(i, j)` gets the row of its offset `(dh, dw) = pos_i - pos_j`,
  `(dh + gh - 1) * (2 gw - 1) + dw + gw - 1`; the last three rows of the
  table are cls-to-token (query is cls), token-to-cls and cls-to-cls.

  Args:
    grid: the patch grid `(gh, gw)`.

  Returns:
    int32 array `[gh * gw + 1, gh * gw + 1]`.
  """
  gh, gw = grid
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  dh = rows[:, None] - rows[None, :] + gh - 1
  dw = cols[:, None] - cols[None, :] + gw - 1
  size = num_relative_distances(grid)
  out = np.empty((gh * gw + 1,) * 2, np.int32)
  out[1:, 1:] = dh * (2 * gw - 1) + dw
  out[0, :] = size - 3
  out[:, 0] = size - 2
  out[0, 0] = size - 1
  out.setflags(write=False)
  return out


def num_relative_distances(grid: tuple[int, int]) -> int:
  """Rows of the relative position bias table for a `grid` of patches."""
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


class PatchEmbed(nnx.Module):
  """Non-overlapping `patch x patch` convolution (`patch_embed.proj`)."""

  def __init__(self, in_channels: int, dim: int, patch: int, *,
               rngs: nnx.Rngs):
    self.proj = nnx.Conv(in_channels, dim, (patch, patch), (patch, patch),
                         padding='VALID', rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.proj(x)
    return h.reshape(h.shape[0], -1, h.shape[-1])


class Attention(nnx.Module):
  """Multi-head self-attention with a per-layer relative position bias."""

  def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], *,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads '
                       f'{num_heads}')
    self.num_heads = num_heads
    self.grid = tuple(grid)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, kernel_init=_trunc02,
                          rngs=rngs)
    self.q_bias = nnx.Param(jnp.zeros((dim,)))
    self.v_bias = nnx.Param(jnp.zeros((dim,)))
    self.relative_position_bias_table = nnx.Param(
        jnp.zeros((num_relative_distances(self.grid), num_heads)))
    self.proj = nnx.Linear(dim, dim, kernel_init=_trunc02, rngs=rngs)

  def position_bias(self) -> jax.Array:
    """The additive attention bias `[heads, tokens, tokens]`."""
    index = relative_position_index(self.grid)
    bias = self.relative_position_bias_table[...][index]
    return jnp.transpose(bias, (2, 0, 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    if n != self.grid[0] * self.grid[1] + 1:
      raise ValueError(f'{n - 1} patches do not fit the {self.grid} patch '
                       'grid the model was built for; build it for this '
                       'input_shape')
    bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.v_bias[...]),
                            self.v_bias[...]])
    qkv = self.qkv(x)
    # The float32 biases must not promote the attention products out of the
    # compute dtype; the softmax itself runs in float32.
    qkv = (qkv + bias.astype(qkv.dtype)).reshape(b, n, 3, self.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (q.shape[-1] ** -0.5)
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k)
    logits = logits.astype(jnp.float32) + self.position_bias()
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, n, d)
    return self.proj(out)


class Mlp(nnx.Module):
  """`fc1` -> exact GELU -> `fc2`."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, kernel_init=_trunc02, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, kernel_init=_trunc02, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block with layer scale."""

  def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], *,
               mlp_ratio: float, init_values: float, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=_EPS, rngs=rngs)
    self.attn = Attention(dim, num_heads, grid, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=_EPS, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
    # float32, not weakly typed: a weak-typed parameter comes back strong
    # from the first update, and the train step would be compiled twice.
    self.gamma_1 = nnx.Param(jnp.full((dim,), init_values, jnp.float32))
    self.gamma_2 = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.gamma_1[...] * self.attn(self.norm1(x))
    return x + self.gamma_2[...] * self.mlp(self.norm2(x))


class Beit(nnx.Module):
  """BEiT-v2 classifier returning `(fc_norm feature, logits)`.

  Args:
    num_classes: classifier outputs.
    image_size: `(H, W)` of the inputs; fixes the patch grid and so the
      relative position bias tables.
    in_channels: image channels.
    patch_size: patch side (16).
    embed_dim: token width (768 base, 1024 large).
    depth: number of blocks (12 / 24).
    num_heads: attention heads (12 / 16).
    mlp_ratio: MLP hidden width over `embed_dim` (4).
    init_values: initial layer-scale value (1e-5, as timm).
    remat: rematerialise each block in the backward pass.
    rngs: initialisation keys.
  """

  TORCH_RENAMES = ((r'^fc$', 'head'),)

  def __init__(self, num_classes: int, image_size: tuple[int, int], *,
               in_channels: int = 3, patch_size: int = 16,
               embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_ratio: float = 4.0, init_values: float = 1e-5,
               remat: bool = False, rngs: nnx.Rngs):
    grid = (image_size[0] // patch_size, image_size[1] // patch_size)
    if min(grid) < 1:
      raise ValueError(f'image size {tuple(image_size)} is smaller than one '
                       f'{patch_size}x{patch_size} patch')
    self.grid = grid
    self.remat = remat
    self.feature_dim = embed_dim
    self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size,
                                  rngs=rngs)
    self.cls_token = nnx.Param(_trunc02(rngs.params(), (1, 1, embed_dim)))
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, grid, mlp_ratio=mlp_ratio,
              init_values=init_values, rngs=rngs) for _ in range(depth)])
    self.fc_norm = nnx.LayerNorm(embed_dim, epsilon=_EPS, rngs=rngs)
    # Upstream shrinks the initial classifier (init_scale 1e-3) and divides
    # each block's output projections by sqrt(2 * layer).
    self.fc = nnx.Linear(
        embed_dim, num_classes,
        kernel_init=lambda k, s, d=jnp.float32: 1e-3 * _trunc02(k, s, d),
        rngs=rngs)
    for i, blk in enumerate(self.blocks):
      for lin in (blk.attn.proj, blk.mlp.fc2):
        lin.kernel[...] = lin.kernel[...] / np.sqrt(2.0 * (i + 1))

  def tokens(self, x: jax.Array) -> jax.Array:
    """`x: [B, H, W, C]` -> final tokens `[B, 1 + patches, D]`."""
    h = self.patch_embed(x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(h.dtype),
                           (h.shape[0], 1, h.shape[-1]))
    h = jnp.concatenate([cls, h], axis=1)
    for blk in self.blocks:
      if self.remat:
        h = nnx.remat(lambda b, t: b(t))(blk, h)
      else:
        h = blk(h)
    return h

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`x: [B, H, W, C]` -> `fc_norm(mean of patch tokens)` `[B, D]`."""
    del train  # No dropout or batch statistics.
    return self.fc_norm(jnp.mean(self.tokens(x)[:, 1:], axis=1))

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    f = self.features(x, train)
    return f, self.fc(f)


_SIZES = {
    'beitv2_base_patch16_224': dict(embed_dim=768, depth=12, num_heads=12),
    'beitv2_large_patch16_224': dict(embed_dim=1024, depth=24, num_heads=16),
}


def _builder(name: str):
  size = _SIZES[name]

  def build(num_classes: int, input_shape: tuple, *, rngs: nnx.Rngs,
            embed_dim: int = size['embed_dim'], depth: int = size['depth'],
            num_heads: int = size['num_heads'], remat: bool = False) -> Beit:
    """Builds the model for `input_shape = (H, W, C)` images."""
    return Beit(num_classes, (int(input_shape[0]), int(input_shape[1])),
                in_channels=int(input_shape[-1]), embed_dim=embed_dim,
                depth=depth, num_heads=num_heads, remat=remat, rngs=rngs)

  build.__name__ = name
  build.default_image_size = 224
  return build


MODELS = {name: _builder(name) for name in _SIZES}
