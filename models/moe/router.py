"""Routers: per-token affinities to every expert, computed in fp32.

- `softmax` (DiffMoE, TC-DiT, EC-DiT, Diff-MoE): logits = x . W_g (no bias), scores = softmax
  over experts.
- `sigmoid_bias` (DeepSeek-V3, the practical recipe): scores = sigmoid(logits); top-k is chosen on
  scores + a per-expert balancing bias that is not trained by gradients but nudged after each
  optimiser step towards equal load (`update_bias`), the auxiliary-loss-free balancing.

W_g's init (`model.moe.router_init`, auto = each reference's own): N(0, router_init_std = 0.006)
for expert choice (DiffMoE, EC-DiT), kaiming-uniform U(+-1/sqrt(d)) for softmax token choice
(TC-DiT, Diff-MoE), kaiming-normal N(0, 2/d) for the sigmoid_bias router (the recipe's code).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import math

from torch import nn

from models.moe import init
from models.moe.state import Fp32Buffers


def router_init_scheme(scheme: str, routing: str, kind: str) -> str:
    """The router init `scheme` (model.moe.router_init) with `auto` resolved for this routing."""
    if scheme not in ("auto", "normal", "kaiming_uniform", "kaiming_normal"):
        raise ValueError(f"model.moe.router_init: unknown init {scheme!r}")
    if scheme != "auto":
        return scheme
    if routing != "token_choice":
        return "normal"
    return "kaiming_normal" if kind == "sigmoid_bias" else "kaiming_uniform"


class Router(Fp32Buffers):
    fp32_buffers = ("balance_bias", "load")

    def __init__(self, dim: int, num_experts: int, kind: str, block_index: int, scheme: str = "auto",
                 init_std: float = 0.006, routing: str = "diffmoe"):
        super().__init__()
        if kind not in ("softmax", "sigmoid_bias"):
            raise ValueError(f"model.moe.router: unknown router {kind!r}")
        self.kind = kind
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.init_scheme = router_init_scheme(scheme, routing, kind)
        gen = init.init_generator(block_index, "router")
        if self.init_scheme == "normal":
            init.normal(self.weight, init_std, gen)
        elif self.init_scheme == "kaiming_uniform":
            init.linear_default(self.weight, dim, gen)  # torch's kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(d))
        else:
            init.normal(self.weight, math.sqrt(2.0 / dim), gen)  # torch's kaiming_normal_ defaults
        if kind == "sigmoid_bias":
            self.register_buffer("balance_bias", torch.zeros(num_experts))
            # (token, expert) choices counted since the last bias update; summed over ranks then.
            self.register_buffer("load", torch.zeros(num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (affinity [T, E] used as combine weights, selection score [T, E]), both >= fp32."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, also under bf16 autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.weight.to(dtype))
        if self.kind == "softmax":
            scores = logits.softmax(dim=-1)
            return scores, scores
        scores = logits.sigmoid()
        return scores, scores + self.balance_bias

    def probabilities(self, affinity: torch.Tensor) -> torch.Tensor:
        """Affinities normalised to a distribution per token (for balance loss and entropy)."""
        return affinity if self.kind == "softmax" else affinity / affinity.sum(-1, keepdim=True).clamp_min(1e-20)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3: + rate for experts below the mean load, - rate above it."""
        self.balance_bias.add_(rate * torch.sign(load.mean() - load))
        self.load.zero_()
