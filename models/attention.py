"""Multi-head self-attention of the DiT block, with optional 2D rotary position embedding.

Two interchangeable kernels (`model.attention`):
- `sdpa`: `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU);
- `math`: the explicit softmax(Q K^T / sqrt(D)) V reference.

2D RoPE (`model.position: rope`, the recipe and Diff-MoE): the head dimension D is split into a
y half (first D/2 channels, rotated by the token's row) and an x half (last D/2, rotated by its
column). Each half is rotated "rotate-half" style: its first and second quarters form the pairs,
with frequencies 1 / 10000^(i / (D/4)), i = 0 .. D/4 - 1. Q and K are rotated, V is not, so the
score of two tokens depends only on their (row, column) offset.

`CrossAttention` (text-to-image): image tokens query the projected text-encoder token states;
padding tokens of the captions are masked out of the keys.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [N, D] float32


def rope_2d_tables(grid_h: int, grid_w: int, head_dim: int, device: torch.device | str | None = None,
                   base: float = 10000.0) -> RopeTables:
    """cos/sin tables [grid_h * grid_w, head_dim] for tokens in row-major (row, column) order."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)
    angle_y = rows[:, None] * freqs  # [N, D/4]
    angle_x = cols[:, None] * freqs
    # rotate-half layout inside each half: the same angle for channel j and channel j + D/4
    angles = torch.cat([angle_y, angle_y, angle_x, angle_x], dim=1)  # [N, D]
    return angles.cos(), angles.sin()


def _rotate_half_per_axis(x: torch.Tensor) -> torch.Tensor:
    """Within each of the two halves (y, x) of the last dim, (a, b) -> (-b, a)."""
    y1, y2, x1, x2 = x.chunk(4, dim=-1)
    return torch.cat([-y2, y1, -x2, x1], dim=-1)


def apply_rope_2d(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate x [..., N, D] by the tables; computed in float32, returned in x's dtype."""
    cos, sin = tables
    xf = x.float()
    return (xf * cos + _rotate_half_per_axis(xf) * sin).to(x.dtype)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V for [B, H, N, D] tensors; the reference for the fused kernels.
    `mask` (bool, broadcastable to [B, H, N, M], True = attend) removes keys from the softmax."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, D] attention output through the `sdpa` or `math` kernel (mask as in math_attention)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return math_attention(q, k, v, mask)


class _Heads(nn.Module):
    """What both attentions share: the head split and the kernel choice."""

    def __init__(self, dim: int, num_heads: int, kernel: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if kernel not in ("sdpa", "math"):
            raise ValueError(f"unknown attention kernel {kernel!r} (known: 'sdpa', 'math')")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel = kernel


class Attention(_Heads):
    """Self-attention over the token sequence: qkv projection, heads, kernel, output projection."""

    def __init__(self, dim: int, num_heads: int, kernel: Literal["sdpa", "math"] = "sdpa"):
        super().__init__(dim, num_heads, kernel)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope_2d(q, rope), apply_rope_2d(k, rope)
        out = attend(q, k, v, self.kernel)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def flops_per_sample(self, num_tokens: int) -> float:
        """Forward FLOPs (2 * MACs) for one sample: projections plus Q K^T and A V."""
        d = self.num_heads * self.head_dim
        projections = num_tokens * (d * 3 * d + d * d)
        scores_and_values = 2 * num_tokens * num_tokens * d
        return 2.0 * (projections + scores_and_values)


class CrossAttention(_Heads):
    """Image tokens [B, N, d] attend to context tokens [B, L, d] (projected text states); keys of
    padding tokens (`mask` False) are excluded. No position encoding: the text encoder has its own."""

    def __init__(self, dim: int, num_heads: int, kernel: Literal["sdpa", "math"] = "sdpa"):
        super().__init__(dim, num_heads, kernel)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, d], context [B, L, d], mask [B, L] bool with at least one True per row."""
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, self.kernel, mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def flops_per_sample(self, num_tokens: int, context_tokens: int) -> float:
        """Forward FLOPs (2 * MACs) for one sample: q, kv and output projections, Q K^T and A V."""
        d = self.num_heads * self.head_dim
        projections = num_tokens * 2 * d * d + context_tokens * 2 * d * d
        scores_and_values = 2 * num_tokens * context_tokens * d
        return 2.0 * (projections + scores_and_values)
