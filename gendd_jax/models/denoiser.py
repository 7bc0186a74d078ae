"""The split-token diffusion head: an AdaLN-modulated residual MLP.

One small network denoises every token of the teacher feature. Its
conditioning is `y = t_emb + c_emb + pos_emb`: a sinusoidal timestep embedding
through an MLP, a linear embedding of the (normalised) student feature, and a
learned embedding of the token's index. Attribute paths mirror the PyTorch
reference's state-dict names so imported weights map one to one.

The forward pass is split so callers can do shared work once: `embed_time`
depends only on the timestep, `embed_cond` only on the image, and `trunk`
accepts a conditioning `y` that broadcasts against the tokens `x`. The adaLN
modulations, which are most of a row's multiply-adds (11 of 17 `W x W`
products at depth 3), depend on `y` alone: `modulations(y)` computes them
and `trunk_modulated(x, mods)` runs the rest, so tokens that share `y` share
them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int = 256,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding `[cos(t f), sin(t f)]`, `t: [...] -> [..., dim]`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) *
                  jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], -1)
  return emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


class TimestepEmbedder(nnx.Module):
  """Timestep -> sinusoidal features -> Linear-SiLU-Linear."""

  def __init__(self, width: int, freq_dim: int = 256, *, dtype=None,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.freq_dim = freq_dim
    self.mlp_0 = nnx.Linear(freq_dim, width, kernel_init=init, dtype=dtype,
                            rngs=rngs)
    self.mlp_2 = nnx.Linear(width, width, kernel_init=init, dtype=dtype,
                            rngs=rngs)

  def mlp(self, freqs: jax.Array) -> jax.Array:
    return self.mlp_2(nnx.silu(self.mlp_0(freqs)))

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp(timestep_embedding(t, self.freq_dim))


class ResBlock(nnx.Module):
  """LayerNorm -> adaLN shift/scale -> Linear-SiLU-Linear -> gated residual."""

  def __init__(self, width: int, *, dtype=None, rngs: nnx.Rngs):
    self.in_ln = nnx.LayerNorm(width, epsilon=1e-6, use_fast_variance=False,
                               dtype=dtype, rngs=rngs)
    self.mlp_0 = nnx.Linear(width, width, kernel_init=_xavier, dtype=dtype,
                            rngs=rngs)
    self.mlp_2 = nnx.Linear(width, width, kernel_init=_xavier, dtype=dtype,
                            rngs=rngs)
    self.adaLN_modulation = nnx.Linear(width, 3 * width, kernel_init=_zeros,
                                       dtype=dtype, rngs=rngs)

  def modulation(self, y: jax.Array) -> tuple[jax.Array, ...]:
    """`(shift, scale, gate)`, each `[..., W]`, from conditioning `y`."""
    return tuple(jnp.split(self.adaLN_modulation(nnx.silu(y)), 3, -1))

  def modulated(self, x: jax.Array, mod: tuple[jax.Array, ...]
                ) -> jax.Array:
    """The block on `x` given `modulation(y)` (broadcastable against `x`)."""
    shift, scale, gate = mod
    h = modulate(self.in_ln(x), shift, scale)
    h = self.mlp_2(nnx.silu(self.mlp_0(h)))
    return x + gate * h

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.modulated(x, self.modulation(y))


class FinalLayer(nnx.Module):
  """Affine-free LayerNorm -> adaLN shift/scale -> Linear."""

  def __init__(self, width: int, out_dim: int, *, dtype=None,
               rngs: nnx.Rngs):
    self.norm_final = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False,
                                    use_bias=False, use_fast_variance=False,
                                    dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(width, out_dim, kernel_init=_zeros, dtype=dtype,
                             rngs=rngs)
    self.adaLN_modulation = nnx.Linear(width, 2 * width, kernel_init=_zeros,
                                       dtype=dtype, rngs=rngs)

  def modulation(self, y: jax.Array) -> tuple[jax.Array, ...]:
    """`(shift, scale)`, each `[..., W]`, from conditioning `y`."""
    return tuple(jnp.split(self.adaLN_modulation(nnx.silu(y)), 2, -1))

  def modulated(self, x: jax.Array, mod: tuple[jax.Array, ...]
                ) -> jax.Array:
    shift, scale = mod
    return self.linear(modulate(self.norm_final(x), shift, scale))

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.modulated(x, self.modulation(y))


class DenoiserMLP(nnx.Module):
  """AdaLN-MLP denoiser over `token_dim` tokens, `2 * token_dim` outputs.

  Args:
    token_dim: channels per token `C`.
    cond_dim: width of the condition (the student feature).
    width: hidden width (reference 1024).
    depth: number of residual blocks (reference 3).
    num_tokens: tokens per feature (`teacher_dim // token_dim`).
    freq_dim: sinusoidal timestep features (256).
    remat: rematerialise residual blocks in the backward pass.
    dtype: computation dtype (parameters stay float32).
  """

  # NNX paths -> the reference's state-dict names (see `convert`).
  TORCH_RENAMES = ((r'(^|\.)mlp_(\d)', r'\1mlp.\2'),
                   (r'adaLN_modulation$', 'adaLN_modulation.1'))

  def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int,
               num_tokens: int, *, freq_dim: int = 256, remat: bool = False,
               dtype=None, rngs: nnx.Rngs):
    self.token_dim = token_dim
    self.num_tokens = num_tokens
    self.remat = remat
    self.time_embed = TimestepEmbedder(width, freq_dim, dtype=dtype,
                                       rngs=rngs)
    self.cond_embed = nnx.Linear(cond_dim, width, kernel_init=_xavier,
                                 dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Embed(num_tokens, width,
                               embedding_init=nnx.initializers.normal(1.0),
                               dtype=dtype, rngs=rngs)
    self.input_proj = nnx.Linear(token_dim, width, kernel_init=_xavier,
                                 dtype=dtype, rngs=rngs)
    self.res_blocks = nnx.List(
        [ResBlock(width, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.final_layer = FinalLayer(width, 2 * token_dim, dtype=dtype,
                                  rngs=rngs)

  def embed_time(self, t: jax.Array) -> jax.Array:
    """`t: [...]` network timesteps -> `[..., W]`."""
    return self.time_embed(t)

  def embed_time_table(self, timesteps: jax.Array) -> jax.Array:
    """`[T]` timesteps -> `[T, W]`, for gathering per row.

    When `timesteps` is a constant (a schedule's timestep map) the sinusoidal
    features are evaluated once at trace time instead of in every step: the
    same values, without `T x freq_dim` sin/cos per step.
    """
    with jax.ensure_compile_time_eval():
      freqs = timestep_embedding(timesteps, self.time_embed.freq_dim)
    return self.time_embed.mlp(freqs)

  def embed_cond(self, z: jax.Array) -> jax.Array:
    """`z: [..., cond_dim]` -> `[..., W]`; a zeroed `z` gives the bias."""
    return self.cond_embed(z)

  def embed_pos(self, token_idx: jax.Array) -> jax.Array:
    return self.pos_embed(token_idx)

  def pos_table(self) -> jax.Array:
    """`[num_tokens, W]` position embeddings."""
    return self.pos_embed.embedding[...]

  def trunk(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Denoise tokens `x: [..., C]` under conditioning `y` (broadcastable)."""
    h = self.input_proj(x)
    for block in self.res_blocks:
      if self.remat:
        h = nnx.remat(lambda b, h_, y_: b(h_, y_))(block, h, y)
      else:
        h = block(h, y)
    return self.final_layer(h, y)

  def modulations(self, y: jax.Array) -> list[tuple[jax.Array, ...]]:
    """Every adaLN modulation of the trunk for conditioning `y: [..., W]`.

    One `(shift, scale, gate)` per residual block, then the final layer's
    `(shift, scale)`, each `[..., W]`. They depend on `y` alone, so a caller
    whose tokens share a conditioning computes them once and broadcasts
    (`trunk_modulated`).
    """
    return ([block.modulation(y) for block in self.res_blocks] +
            [self.final_layer.modulation(y)])

  def trunk_modulated(self, x: jax.Array,
                      mods: list[tuple[jax.Array, ...]]) -> jax.Array:
    """`trunk(x, y)` given `mods = modulations(y)` (broadcastable to `x`'s
    rows): the same operations, without the modulation products."""
    if len(mods) != len(self.res_blocks) + 1:
      raise ValueError(f'expected {len(self.res_blocks) + 1} modulations, '
                       f'got {len(mods)}')
    h = self.input_proj(x)
    for block, mod in zip(self.res_blocks, mods[:-1]):
      if self.remat:
        h = nnx.remat(lambda b, h_, m_: b.modulated(h_, m_))(block, h, mod)
      else:
        h = block.modulated(h, mod)
    return self.final_layer.modulated(h, mods[-1])

  def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array,
               token_idx: jax.Array) -> jax.Array:
    """Row-wise forward as in the reference: `x [N, C], t [N], c [N, Dz]`."""
    y = self.embed_time(t) + self.embed_cond(c) + self.embed_pos(token_idx)
    return self.trunk(x, y)
