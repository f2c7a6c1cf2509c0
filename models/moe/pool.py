"""Token pools: where an expert looks for the tokens it chooses (the paper's accessibility levels).

A pool answers selection questions over *its* tokens. The local pools here cover `sample`
(each sample's tokens, EC-DiT) and `micro_batch` (this process's whole batch, reference DiffMoE).
`parallel.token_pool` implements the same interface for `ep_group` / `world`, whose tokens live
on several ranks; only routing metadata travels for selection, never hidden states.

Ordering: a token's pool index is its position in the concatenation of the pool's ranks'
flattened [B, N] tokens in rank order. Ties are broken by the lower pool index, so a selection
is exact and identical on every rank and equal to the single-process one over the concatenation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class TokenPool(ABC):
    scope: str

    @abstractmethod
    def pool_tokens(self, num_tokens: int, tokens_per_sample: int) -> int:
        """Number of tokens in one pool, given this rank's `num_tokens` (= B * N)."""

    @abstractmethod
    def topk_mask(self, scores: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        """[T, E] scores -> [T, E] bool: for each expert, its k highest-scoring tokens of each pool
        (ties to the lower pool index). Entries equal to -inf are never selected."""

    @abstractmethod
    def kth_largest(self, values: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        """[T, E] -> [E]: each expert's k-th largest value within its pool, averaged over all pools
        of the job (so every rank gets the same vector)."""

    def pool_sum(self, values: torch.Tensor) -> torch.Tensor:
        """A per-rank statistic (e.g. [E] choice counts) summed over the ranks whose tokens share this
        rank's pool; not differentiable. Pools whose tokens are all on this rank return it as is;
        cross-rank pools override this with a sum over their group (token choice's balance loss
        then uses the pool's expert loads, as one process holding the whole pool would)."""
        return values


def _ranked_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[G, n, E] -> [G, n, E] bool: top-k along dim 1, ties to the lower index, -inf excluded."""
    k = min(k, scores.shape[1])
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    # Everything above the k-th largest value, then the lowest-index entries equal to it until k are
    # taken: the stable-sort answer, without sorting (a few times faster than a sort along dim 1).
    kth = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above, tied = scores > kth, scores == kth
    room = k - above.sum(dim=1, keepdim=True)
    mask = above | (tied & (tied.cumsum(dim=1) <= room))
    return mask & (scores != float("-inf"))


class LocalPool(TokenPool):
    """`sample` (one pool per sample) or `micro_batch` (one pool for this process's batch)."""

    def __init__(self, scope: str):
        if scope not in ("sample", "micro_batch"):
            raise ValueError(f"LocalPool handles 'sample' and 'micro_batch', not {scope!r}")
        self.scope = scope

    def _groups(self, x: torch.Tensor, tokens_per_sample: int) -> torch.Tensor:
        n = tokens_per_sample if self.scope == "sample" else x.shape[0]
        return x.reshape(-1, n, x.shape[-1])

    def pool_tokens(self, num_tokens: int, tokens_per_sample: int) -> int:
        return tokens_per_sample if self.scope == "sample" else num_tokens

    def topk_mask(self, scores: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        grouped = self._groups(scores, tokens_per_sample)
        return _ranked_topk_mask(grouped, k).reshape(scores.shape)

    def kth_largest(self, values: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        grouped = self._groups(values, tokens_per_sample)
        k = max(1, min(k, grouped.shape[1]))
        return torch.topk(grouped, k, dim=1).values[:, k - 1].mean(0)
