"""Token dispatch seam of the MoE layer contract (DESIGN.md):

    plan     = pool/router selection  -> RoutingPlan of (token, expert, gate) pairs
    routed   = dispatcher.dispatch(plan, x, sample_inputs)  # tokens for this rank's experts, grouped
    y_pairs  = experts(routed.tokens, routed.sizes, *routed.sample_inputs)
    y        = dispatcher.combine(y_pairs, routed)      # [T_local, d] = sum over pairs of gate * y

`LocalDispatcher` is the single-process one (all experts local). `parallel.dispatch` provides the
all-to-all dispatcher with the same interface; `models/` never imports torch.distributed.
A dispatcher's `expert_offset` is the global id of the first expert it holds (`Routed.sizes` row group i
belongs to global expert `expert_offset + i`); an MoE layer never assumes all experts are local.
Side inputs that are constant over a sample (time-aware conditioning, recalibration means) are
passed per sample and expanded to rows by the dispatcher, so they travel once per (sample,
destination rank), not once per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from models.moe.grouped_mm import GroupSizes


@dataclass
class RoutingPlan:
    """The selected (token, expert) pairs of one MoE layer call on this rank.

    mask:              [T, E] bool, the selected pairs
    weights:           [T, E] combine weights (read at the selected pairs; carry the router's gradient)
    tokens_per_sample: tokens of one sample (rows [s * n, (s + 1) * n) are sample s)
    expert_tokens:     [E, K] long, each expert's tokens in ascending order, when every expert takes
                       exactly K tokens of this rank (expert choice in a pool of this rank)
    token_experts:     [T, top_k] long, each token's experts, when every token keeps all of its top-k
                       choices (token choice without a capacity drop)
    checks:            deferred checks of the selection (see `models.moe.pool.Selection`)

    Given `expert_tokens` or `token_experts`, every shape of the dispatch is known on the host and
    no device->host sync is needed; from the mask alone the pair count is data-dependent.
    """

    mask: torch.Tensor
    weights: torch.Tensor
    tokens_per_sample: int
    expert_tokens: torch.Tensor | None = None
    token_experts: torch.Tensor | None = None
    checks: tuple = ()

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, GroupSizes]:
        """-> (token of each pair [P], gate of each pair [P], per-expert sizes), pairs grouped by expert
        and in ascending token order within an expert."""
        num_experts = self.num_experts
        if self.expert_tokens is not None:  # host-known counts: K per expert
            tokens = self.expert_tokens.reshape(-1)
            gate = self.weights.t().gather(1, self.expert_tokens).reshape(-1)
            return tokens, gate, GroupSizes.equal(num_experts, self.expert_tokens.shape[1])
        if self.token_experts is not None:  # T * top_k pairs; per-expert counts only on the device
            experts = self.token_experts.reshape(-1)
            order = torch.sort(experts, stable=True).indices  # by expert, then token
            counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device).index_add_(
                0, experts, torch.ones_like(experts))
            gate = self.weights.gather(1, self.token_experts).reshape(-1).index_select(0, order)
            return order // self.token_experts.shape[1], gate, GroupSizes(experts.numel(), num_experts, device=counts)
        # Data-dependent pair count: nonzero is this path's one device->host sync.
        expert_index, token_index = self.mask.t().nonzero(as_tuple=True)  # row-major over [E, T]: by expert
        counts = self.mask.sum(0)
        return token_index, self.weights.t()[expert_index, token_index], GroupSizes(token_index.numel(), num_experts,
                                                                                    device=counts)


def verify_checks(checks: tuple, values: list) -> None:
    """Raise the message of the first deferred check whose value (read back at a host sync) is wrong."""
    for (_, expected, message), got in zip(checks, values):
        if int(got) != expected:
            raise ValueError(message.format(got=int(got)))


class Routed:
    """What the experts of this rank receive: `tokens` [R, d] grouped by local expert, `sizes` rows per
    local expert, `sample_inputs` the per-sample side inputs copied to each row. A dispatcher whose
    exchange is still in flight passes `arrive`, run on the first read of `tokens` / `sample_inputs`
    (work between `dispatch` and that read overlaps the exchange); `state` and `arrived` are the
    dispatcher's own bookkeeping for combine."""

    def __init__(self, sizes: GroupSizes, tokens: torch.Tensor | None = None,
                 sample_inputs: list[torch.Tensor] | None = None, state: Any = None,
                 arrive: Callable[[], tuple[torch.Tensor, list[torch.Tensor], Any]] | None = None):
        self.sizes, self.state = sizes, state
        self._tokens, self._sample_inputs, self._arrive = tokens, sample_inputs or [], arrive
        self._arrived: Any = None

    def _wait(self) -> None:
        if self._arrive is not None:
            self._tokens, self._sample_inputs, self._arrived = self._arrive()
            self._arrive = None

    @property
    def tokens(self) -> torch.Tensor:
        self._wait()
        return self._tokens

    @property
    def sample_inputs(self) -> list[torch.Tensor]:
        self._wait()
        return self._sample_inputs

    @property
    def arrived(self) -> Any:
        self._wait()
        return self._arrived


class LocalDispatcher:
    """All experts on this process: gather rows by the plan, scatter-add gated outputs back.
    No device->host sync when the plan carries `expert_tokens` or `token_experts`."""

    expert_offset = 0  # first global expert id held here

    def dispatch(self, plan: RoutingPlan, x: torch.Tensor, sample_inputs: tuple[torch.Tensor, ...] = ()) -> Routed:
        """x [T, d]; sample_inputs: per-sample side inputs [T / tokens_per_sample, *] (e.g. conditioning)."""
        if plan.checks:
            verify_checks(plan.checks, torch.stack([c[0] for c in plan.checks]).tolist())
        rows, gate, sizes = plan.pairs()
        samples = rows // plan.tokens_per_sample
        # index_select: its backward is an index_add, cheaper than advanced indexing's index_put
        return Routed(sizes, x.index_select(0, rows), [s.index_select(0, samples) for s in sample_inputs],
                      state=(rows, gate, plan.num_tokens))

    def combine(self, expert_out: torch.Tensor, routed: Routed) -> torch.Tensor:
        rows, gate, num_tokens = routed.state
        weighted = expert_out * gate.unsqueeze(-1).to(expert_out.dtype)
        return expert_out.new_zeros(num_tokens, expert_out.shape[-1]).index_add_(0, rows, weighted)
