"""Diff-MoE's space-adaptive parts: the depthwise-conv spatial path and global channel recalibration."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.moe import init


class DepthwiseTokenConv(nn.Module):
    """k x k depthwise convolution over the square token grid: [B, N, d] -> [B, N, d].

    Diff-MoE's DiT block convolves its stream before the FFN slot's norm and modulation; the
    residual skips it (models/dit.py). Default Conv2d init from the block's seed.
    """

    def __init__(self, dim: int, kernel: int, block_index: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        gen = init.init_generator(block_index, "spatial_conv")
        init.linear_default(self.conv.weight, kernel * kernel, gen)
        init.linear_default(self.conv.bias, kernel * kernel, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the depthwise-conv spatial path needs a square token grid, got {n} tokens")
        grid = x.transpose(1, 2).reshape(b, d, side, side)
        return self.conv(grid).reshape(b, d, n).transpose(1, 2)


class ChannelRecalibration(nn.Module):
    """Global recalibration: mean-pooled sample tokens -> Linear(d, r) -> ReLU -> Linear(r, hidden)
    -> Sigmoid, channel weights multiplying every routed expert's hidden activations. Both maps
    xavier, as DiT's init leaves them in the Diff-MoE reference."""

    def __init__(self, dim: int, hidden: int, rank: int, block_index: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        gen = init.init_generator(block_index, "recalibration")
        init.xavier_uniform(self.down.weight, dim, rank, gen)
        init.xavier_uniform(self.up.weight, rank, hidden, gen)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [R, d] (each row: its sample's mean token) -> [R, hidden] in (0, 1)."""
        return torch.sigmoid(self.up(F.relu(self.down(pooled))))
