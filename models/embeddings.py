"""Input embeddings of the DiT: image patches, fixed 2D sin-cos positions, timesteps, class labels,
and the projection of frozen text-encoder outputs (text-to-image)."""
from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: sin of positions * omega_i in the first half, cos in the second,
    omega_i = 1 / 10000^(i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, dim] fixed position table for row-major tokens (as DiT/MAE): the first dim/2
    channels encode the token's column, the last dim/2 its row. Built on the CPU in float64."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)
    cols = coords.repeat(grid_size)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)(W/p), d] tokens in row-major order (a stride-p convolution)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (0 noise, 1 data) -> [B, d]: sinusoidal features of s = time_offset + time_scale * t,
    then an MLP.

    The references feed their own time variable, which is affine in ours (model.time_offset /
    model.time_scale): the DiffMoE and recipe flow code raw t (0, 1), Diff-MoE's flow code 1 - t
    (1, -1; its t = 1 is noise), DiT's DDPM the step index n = 999 - 1000 t (999, -1000; n = 0 is the
    least noisy step). The default (0, 1000) embeds 1000 t.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0, time_scale: float = 1000.0,
                 time_offset: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.time_scale = time_scale
        self.time_offset = time_offset
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequency_features(self, t: torch.Tensor) -> torch.Tensor:
        """[B, frequency_dim] = [cos(s f_i), sin(s f_i)], s = time_offset + time_scale t, f_i = max_period^(-i/half)."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (self.time_offset + self.time_scale * t.float())[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.frequency_features(t)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> [B, d]; row `num_classes` is the null class used for classifier-free guidance.

    The model never drops labels itself: the trainer replaces dropped labels by the null class with
    per-sample randomness, so the global batch is the same whatever the world size.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.null_class = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class TextProjection(nn.Module):
    """Frozen text-encoder outputs -> the DiT's width d.

    Token states [B, L, D_text] -> context [B, L, d] for every block's cross-attention
    (Linear -> GELU(tanh) -> Linear, PixArt-alpha's caption projection), computed once per forward;
    the pooled vector [B, D_text] -> [B, d] added to the adaLN conditioning c = t_emb + pooled_emb
    (Linear -> SiLU -> Linear, like the timestep MLP). Inputs are cast to the weights' dtype.
    """

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.text_dim = text_dim
        self.token_mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.pooled_mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.shape[-1] != self.text_dim or pooled.shape[-1] != self.text_dim:
            raise ValueError(f"text embeddings of width {tokens.shape[-1]} (pooled {pooled.shape[-1]}), "
                             f"the model expects model.text.dim={self.text_dim}")
        dtype = self.token_mlp[0].weight.dtype
        return self.token_mlp(tokens.to(dtype)), self.pooled_mlp(pooled.to(dtype))

    def flops_per_sample(self, context_tokens: int) -> float:
        """Forward FLOPs (2 * MACs) of one sample's token and pooled projections."""
        d_text, d = self.text_dim, self.token_mlp[2].out_features
        return 2.0 * (context_tokens + 1) * (d_text * d + d * d)
