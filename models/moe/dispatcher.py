"""Token dispatch seam of the MoE layer contract (DESIGN.md):

    plan     = pool/router selection  -> RoutingPlan of (token, expert, gate) pairs
    routed   = dispatcher.dispatch(plan, x, *extras)   # tokens for this rank's experts, grouped
    y_pairs  = experts(routed.tokens, routed.counts, *routed.extras)
    y        = dispatcher.combine(y_pairs, routed)      # [T_local, d] = sum over pairs of gate * y

`LocalDispatcher` is the single-process one (all experts local). `parallel.dispatch` provides the
all-to-all dispatcher with the same interface; `models/` never imports torch.distributed.
A dispatcher's `expert_offset` is the global id of the first expert it holds (`Routed.counts[i]`
belongs to global expert `expert_offset + i`); an MoE layer never assumes all experts are local.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingPlan:
    """Selected (token, expert) pairs of one MoE layer call, sorted by expert id.

    token_index:  [P] long, index into this rank's flattened tokens (0..num_tokens-1)
    expert_index: [P] long, global expert id, non-decreasing
    gate:         [P] float, combine weight (carries the router's gradient)
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    gate: torch.Tensor
    num_tokens: int
    num_experts: int

    @staticmethod
    def from_mask(mask: torch.Tensor, weights: torch.Tensor) -> "RoutingPlan":
        """Plan from a [T, E] bool selection mask and [T, E] combine weights."""
        expert_index, token_index = mask.t().nonzero(as_tuple=True)  # row-major over [E, T]: sorted by expert
        gate = weights.t()[expert_index, token_index]
        return RoutingPlan(token_index, expert_index, gate, mask.shape[0], mask.shape[1])

    def counts(self) -> torch.Tensor:
        """[E] number of pairs per expert."""
        return torch.bincount(self.expert_index, minlength=self.num_experts)


@dataclass
class Routed:
    """What the experts of this rank receive. `counts[i]` rows of `tokens` belong to local expert i."""

    tokens: torch.Tensor  # [R, d] grouped by local expert
    counts: list[int]  # [E_local] host-side row counts per local expert
    extras: list[torch.Tensor] = field(default_factory=list)  # per-row side inputs (e.g. conditioning)
    state: Any = None  # dispatcher-private bookkeeping for combine


class LocalDispatcher:
    """All experts on this process: gather rows by the plan, scatter-add gated outputs back."""

    expert_offset = 0  # first global expert id held here

    def dispatch(self, plan: RoutingPlan, x: torch.Tensor, *extras: torch.Tensor) -> Routed:
        counts = plan.counts().tolist()
        rows = plan.token_index
        # index_select: its backward is an index_add, cheaper than advanced indexing's index_put
        return Routed(x.index_select(0, rows), counts, [e.index_select(0, rows) for e in extras], state=plan)

    def combine(self, expert_out: torch.Tensor, routed: Routed) -> torch.Tensor:
        plan: RoutingPlan = routed.state
        weighted = expert_out * plan.gate.unsqueeze(-1).to(expert_out.dtype)
        out = expert_out.new_zeros(plan.num_tokens, expert_out.shape[-1])
        return out.index_add_(0, plan.token_index, weighted)
