"""Which (token, expert) pairs a routing strategy selects, as [T, E] masks and combine weights.

Selections over more than one token go through the layer's `TokenPool` (`topk_mask`), so the same
code selects within a sample, a micro-batch, or a pool spread over ranks. Only the dynamic
inference rule counts and ranks tokens within this process's batch (the sampling batch), as the
reference DiffMoE does, or within each sample when the pool is `sample` (the paper's local
dynamic intra-sample row).
"""
from __future__ import annotations

import torch

from models.moe.pool import TokenPool


def expert_choice_k(pool_tokens: int, num_experts: int, capacity: float) -> int:
    """Tokens each expert takes from a pool: int(pool_tokens / E * capacity), at least 1."""
    return max(1, int(pool_tokens / num_experts * capacity))


def token_choice_capacity(pool_tokens: int, num_experts: int, top_k: int, capacity: float) -> int:
    """Token-choice expert capacity: int(capacity_factor * pool_tokens * top_k / E), at least 1."""
    return max(1, int(capacity * pool_tokens * top_k / num_experts))


def top_k_choice(select_score: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] -> ([T, E] bool, [T, top_k] expert ids): each token's top_k experts by `select_score`
    (ties to the lower id)."""
    order = torch.sort(select_score, dim=1, descending=True, stable=True).indices[:, :top_k]
    return torch.zeros_like(select_score, dtype=torch.bool).scatter_(1, order, True), order


def token_choice_weights(affinity: torch.Tensor, chosen: torch.Tensor, normalize: bool, scaling: float) -> torch.Tensor:
    """Combine weights [T, E]: the chosen affinities, optionally renormalised to sum 1, times scaling."""
    weights = affinity * chosen
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights * scaling


def drop_over_capacity(chosen: torch.Tensor, priority: torch.Tensor, pool: TokenPool, capacity: int,
                       tokens_per_sample: int) -> torch.Tensor:
    """Keep, for each expert, its `capacity` highest-priority choosing tokens of each pool."""
    masked = priority.masked_fill(~chosen, float("-inf"))
    return pool.topk_mask(masked, capacity, tokens_per_sample) & chosen


def dynamic_choice(score: torch.Tensor, eligible: torch.Tensor, group_tokens: int) -> torch.Tensor:
    """DiffMoE dynamic inference: within each group of `group_tokens` consecutive tokens (one sample
    for pool=sample, the whole batch otherwise), expert e takes its n_e best tokens by router score,
    where n_e is the number of the group's tokens whose predicted probability passed e's threshold."""
    num_tokens, num_experts = score.shape
    grouped = score.reshape(-1, group_tokens, num_experts)
    n = eligible.reshape(-1, group_tokens, num_experts).sum(1, keepdim=True)  # [G, 1, E]
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices  # [G, n, E]
    positions = torch.arange(group_tokens, device=score.device).view(1, -1, 1).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < n).reshape(num_tokens, num_experts)
