"""Shared experts (DeepSeek, the recipe, Diff-MoE): always-on FFNs added to the routed output.

`num_shared_experts` experts of width `shared_expert_hidden` are fused into one FFN of hidden
width num_shared * shared_hidden (the same function, one matmul). They are dense parameters
(replicated on every rank, never dispatched) and run on this rank's tokens directly; with
time-aware experts they are time-conditioned as well (Diff-MoE), without recalibration.
"""
from __future__ import annotations

import torch
from torch import nn

from models.moe.experts import ExpertBank


class SharedExperts(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, *, block_index: int, time_aware: bool, time_rank: int,
                 adaln_init: str = "xavier"):
        super().__init__()
        self.ffn = ExpertBank(1, dim, hidden, activation, block_index=block_index, name="shared",
                              time_aware=time_aware, time_rank=time_rank, adaln_init=adaln_init)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """x [T, d], cond [T, d] or None -> [T, d]."""
        return self.ffn(x, [x.shape[0]], cond)
