"""DiffMoE's capacity predictor: which experts would choose a token, learned from the selections.

Linear(d, d) -> SiLU -> Linear(d, E) on the detached token state, trained with BCE-with-logits
against the expert-choice selection mask. Each expert keeps a threshold: an EMA (decay
`threshold_ema`) of the k-th largest predicted probability of each training step, averaged over all
pools of the job. Dynamic inference lets expert e take as many tokens as have a predicted
probability above its threshold (+ `threshold_shift`).
"""
from __future__ import annotations

import torch
from torch import nn

from models.moe import init
from models.moe.state import Fp32Buffers


class CapacityPredictor(Fp32Buffers):
    fp32_buffers = ("threshold",)

    def __init__(self, dim: int, num_experts: int, block_index: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(dim, num_experts)
        for name, lin in (("predictor.fc1", self.fc1), ("predictor.fc2", self.fc2)):
            init.xavier_uniform(lin.weight, lin.in_features, lin.out_features, init.init_generator(block_index, name))
            init.zeros(lin.bias)
        self.register_buffer("threshold", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] (detached here: the predictor never trains the backbone) -> logits [T, E]."""
        return self.fc2(self.act(self.fc1(x.detach())))

    @torch.no_grad()
    def update_threshold(self, kth_probability: torch.Tensor, decay: float) -> None:
        self.threshold.mul_(decay).add_((1.0 - decay) * kth_probability.to(self.threshold.dtype))
