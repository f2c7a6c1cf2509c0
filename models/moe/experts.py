"""A bank of FFN experts with stacked weights ([E, ...], dim 0 = expert) run as grouped matmuls.

Expert body (DiT MLP or SwiGLU):
    gelu_tanh: y = W2 . gelu(W1 . x + b1) + b2          (DiffMoE / TC-DiT / EC-DiT experts)
    swiglu:    y = W2 . (silu(Wg . x) * (Wu . x))         (recipe / Diff-MoE experts, no bias)
Storage: w1 [E, d, up] (in, out), w2 [E, d, hidden] (out, in).
Optional Diff-MoE parts:
    time-aware: each expert owns a low-rank adaLN, Linear(d, r, no bias) -> ReLU -> Linear(r, 3d)
                of the conditioning c, giving shift, scale, gate; the expert returns
                x + gate * body(LayerNorm(x) * (1 + scale) + shift). `adaln_init` xavier: both
                maps xavier (the Diff-MoE reference: DiT's xavier init overwrites the constructor's
                zeros), zero: Linear(d, r) torch's default and Linear(r, 3d) zero (identity start);
    channel weights [R, hidden] multiply the hidden activations (global recalibration).
Rows arrive grouped by expert (`counts`), so there is no loop over tokens nor over experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.moe import init
from models.moe.grouped_mm import GroupSizes, grouped_linear


class ExpertBank(nn.Module):
    def __init__(self, num: int, dim: int, hidden: int, activation: str, *, block_index: int, name: str,
                 first_expert: int = 0, time_aware: bool = False, time_rank: int = 64, adaln_init: str = "xavier"):
        super().__init__()
        if activation not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"model.moe.activation: unknown activation {activation!r}")
        self.num, self.dim, self.hidden = num, dim, hidden
        self.swiglu = activation == "swiglu"
        self.time_aware = time_aware
        if adaln_init not in ("xavier", "zero"):
            raise ValueError(f"model.moe.expert_adaln_init: unknown init {adaln_init!r}")
        self.adaln_init = adaln_init
        up = 2 * hidden if self.swiglu else hidden  # SwiGLU: gate and up projections fused
        self.w1 = nn.Parameter(torch.empty(num, dim, up))
        # w2 is stored [E, d, hidden] (out, in): with the hidden width contiguous in both weights every
        # product of the backward runs on the faster layout (measured in benchmarks/moe_layer.py).
        self.w2 = nn.Parameter(torch.empty(num, dim, hidden))
        self.b1 = None if self.swiglu else nn.Parameter(torch.empty(num, hidden))
        self.b2 = None if self.swiglu else nn.Parameter(torch.empty(num, dim))
        if time_aware:
            self.ada_down = nn.Parameter(torch.empty(num, dim, time_rank))
            self.ada_up = nn.Parameter(torch.empty(num, time_rank, 3 * dim))
            self.ada_up_bias = nn.Parameter(torch.empty(num, 3 * dim))
        for local in range(num):
            self._init_expert(local, init.init_generator(block_index, name, first_expert + local))

    def _init_expert(self, e: int, gen: torch.Generator) -> None:
        d, h = self.dim, self.hidden
        if self.swiglu:  # gate and up are two d -> h maps
            init.xavier_uniform(self.w1[e, :, :h], d, h, gen)
            init.xavier_uniform(self.w1[e, :, h:], d, h, gen)
        else:
            init.xavier_uniform(self.w1[e], d, h, gen)
            init.zeros(self.b1[e])
            init.zeros(self.b2[e])
        init.xavier_uniform(self.w2[e], h, d, gen)
        if self.time_aware:
            rank = self.ada_down.shape[-1]
            if self.adaln_init == "xavier":
                init.xavier_uniform(self.ada_down[e], d, rank, gen)
                init.xavier_uniform(self.ada_up[e], rank, 3 * d, gen)
            else:
                init.linear_default(self.ada_down[e], d, gen)
                init.zeros(self.ada_up[e])  # every expert starts as identity + 0
            init.zeros(self.ada_up_bias[e])

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, counts: list[int] | GroupSizes, cond: torch.Tensor | None = None,
                channel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [R, d] grouped by expert, counts: rows per expert; cond [R, d] (time-aware); channel_weights [R, hidden]."""
        h_in = x
        if self.time_aware:
            if cond is None:
                raise ValueError("time-aware experts need the conditioning rows `cond`")
            low = F.relu(grouped_linear(cond.to(x.dtype), self.ada_down, None, counts))
            shift, scale, gate = grouped_linear(low, self.ada_up, self.ada_up_bias, counts).chunk(3, dim=-1)
            h_in = F.layer_norm(x, (self.dim,), eps=1e-6) * (1 + scale) + shift
        hidden = grouped_linear(h_in, self.w1, self.b1, counts)
        if self.swiglu:
            g, u = hidden.chunk(2, dim=-1)
            hidden = F.silu(g) * u
        else:
            hidden = F.gelu(hidden, approximate="tanh")
        if channel_weights is not None:
            hidden = hidden * channel_weights.to(hidden.dtype)
        out = grouped_linear(hidden, self.w2.transpose(1, 2), self.b2, counts)
        return x + gate * out if self.time_aware else out
