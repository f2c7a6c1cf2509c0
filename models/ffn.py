"""The FFN slot of a DiT block and the factory that fills it (dense or one of the MoE layers).

Every FFN-slot module has the same call signature, so the block never knows which one it holds:

    ffn(x: [B, N, d], c: [B, d], t: [B]) -> [B, N, d]

`c` is the block's conditioning (t_emb + y_emb), used by time-aware experts; `t` is the diffusion
time in [0, 1] (0 noise, 1 data) used only for per-timestep monitoring.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # models/ sits below engine/: the config is passed in, never imported at run time
    from engine.config import ModelConfig


class DenseFFN(nn.Module):
    """DiT's MLP: Linear -> GELU(tanh) -> Linear (`activation` silu: the recipe's dense blocks)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu_tanh"):
        super().__init__()
        if activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"model.ffn_activation: unknown activation {activation!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh") if activation == "gelu_tanh" else nn.SiLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def activated_params(self) -> int:
        """Parameters applied to each token (all of them; MoE layers report their average)."""
        return sum(p.numel() for p in self.parameters())


def is_moe_block(cfg: ModelConfig, block_index: int) -> bool:
    """MoE replaces the FFN in blocks i with i % every == every - 1 (every=2: the odd blocks)."""
    return cfg.moe.routing != "dense" and block_index % cfg.moe.every == cfg.moe.every - 1


def build_ffn(cfg: ModelConfig, block_index: int, ep_rank: int = 0, ep_size: int = 1) -> nn.Module:
    """The FFN slot of block `block_index`; MoE layers hold experts ep_rank's share of experts."""
    if not is_moe_block(cfg, block_index):
        return DenseFFN(cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), cfg.ffn_activation)
    from models.moe.layer import MoELayer  # MoE issue

    return MoELayer(cfg, block_index, ep_rank=ep_rank, ep_size=ep_size)
