"""Torch reference of the BEiT-v2 fine-tuning classifier (timm key names).

Written for the parity tests: `state_dict()` has the keys and shapes of
timm's `beitv2_*_patch16_224` (plus the `relative_position_index` buffers
that unilm checkpoints carry), and `forward` takes NCHW images and returns
logits. Dropout and drop path are absent (eval only).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def relative_position_index(gh: int, gw: int) -> torch.Tensor:
  """Table row per (query, key) pair; token 0 is cls (see the JAX model)."""
  size = (2 * gh - 1) * (2 * gw - 1) + 3
  pos = torch.cartesian_prod(torch.arange(gh), torch.arange(gw))  # [N, 2]
  rel = pos[:, None, :] - pos[None, :, :]  # [N, N, 2] = pos_q - pos_k.
  patch = (rel[..., 0] + gh - 1) * (2 * gw - 1) + rel[..., 1] + gw - 1
  n = gh * gw
  index = torch.empty(n + 1, n + 1, dtype=torch.long)
  index[1:, 1:] = patch
  index[0, :] = size - 3  # The cls token attends to patches.
  index[:, 0] = size - 2  # Patches attend to the cls token.
  index[0, 0] = size - 1
  return index


class PatchEmbed(nn.Module):

  def __init__(self, cin, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):

  def __init__(self, dim, heads, grid):
    super().__init__()
    self.heads = heads
    self.grid = grid
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.q_bias = nn.Parameter(torch.zeros(dim))
    self.v_bias = nn.Parameter(torch.zeros(dim))
    rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads))
    self.register_buffer('relative_position_index',
                         relative_position_index(*grid))
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias),
                      self.v_bias])
    qkv = F.linear(x, self.qkv.weight, bias)
    q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    att = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    rel = self.relative_position_bias_table[
        self.relative_position_index.view(-1)].view(n, n, -1)
    att = (att + rel.permute(2, 0, 1)).softmax(-1)
    return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, heads, grid, init_values):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads, grid)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)
    self.gamma_1 = nn.Parameter(torch.full((dim,), init_values))
    self.gamma_2 = nn.Parameter(torch.full((dim,), init_values))

  def forward(self, x):
    x = x + self.gamma_1 * self.attn(self.norm1(x))
    return x + self.gamma_2 * self.mlp(self.norm2(x))


class BeitV2(nn.Module):
  """`BeitV2(num_classes, image_size, embed_dim, depth, heads)`."""

  def __init__(self, num_classes=1000, image_size=(224, 224), embed_dim=768,
               depth=12, heads=12, patch=16, in_chans=3, init_values=1e-5):
    super().__init__()
    grid = (image_size[0] // patch, image_size[1] // patch)
    self.patch_embed = PatchEmbed(in_chans, embed_dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.blocks = nn.ModuleList(
        Block(embed_dim, heads, grid, init_values) for _ in range(depth))
    self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.fc_norm(x[:, 1:].mean(1)))


def randomise(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
  """Gives every parameter non-trivial values (the zero-initialised tables
  and biases and the tiny layer scales would hide errors)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(('norm1.weight', 'norm2.weight', 'fc_norm.weight')):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2 and 'table' not in name and 'cls' not in name:
        p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
      else:
        p.copy_(scale * torch.randn(p.shape, generator=g))
