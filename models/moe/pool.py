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
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """What a pool selected for one [T, E] score matrix.

    mask:   [T, E] bool, each expert's chosen tokens of this rank
    index:  [E, K] long (or None), the chosen token positions of each expert in ascending order,
            given when every expert takes exactly K of this rank's tokens (known on the host
            without looking at the data: expert choice over finite scores in a pool of this rank)
    kth:    [E] (or None), the k-th largest of the `kth_of` values of each expert's pool, averaged
            over all pools of the job (every rank gets the same vector)
    checks: deferred consistency checks, (device scalar, expected value, message); the dispatcher
            verifies them at the host sync it makes anyway, so a check costs no sync of its own
    """

    mask: torch.Tensor
    index: torch.Tensor | None = None
    kth: torch.Tensor | None = None
    checks: tuple = ()


class TokenPool(ABC):
    scope: str

    @abstractmethod
    def pool_tokens(self, num_tokens: int, tokens_per_sample: int) -> int:
        """Number of tokens in one pool, given this rank's `num_tokens` (= B * N)."""

    @abstractmethod
    def select(self, scores: torch.Tensor, k: int, tokens_per_sample: int, kth_of: torch.Tensor | None = None,
               finite: bool = False) -> Selection:
        """[T, E] scores -> for each expert, its k highest-scoring tokens of each pool (ties to the lower
        pool index; entries equal to -inf are never selected), and with `kth_of` ([T, E], finite) the
        k-th largest of those values per expert and pool. `finite`: the caller guarantees no score is
        -inf, so every expert takes exactly min(k, pool) tokens of each pool."""

    def topk_mask(self, scores: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        """`select(...).mask`."""
        return self.select(scores, k, tokens_per_sample).mask

    def pool_sum(self, values: torch.Tensor) -> torch.Tensor:
        """A per-rank statistic (e.g. [E] choice counts) summed over the ranks whose tokens share this
        rank's pool; not differentiable. Pools whose tokens are all on this rank return it as is;
        cross-rank pools override this with a sum over their group (token choice's balance loss
        then uses the pool's expert loads, as one process holding the whole pool would)."""
        return values


def mask_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[..., n, E] bool with exactly `count` True entries in each [..., :, e] column -> [..., count, E]
    their positions along dim -2 in ascending order, without a device->host sync (no nonzero): each
    True entry is scattered to its rank among the column's True entries, the rest to a spare row."""
    rank = mask.cumsum(-2) - 1
    slot = torch.where(mask, rank, count)
    positions = torch.arange(mask.shape[-2], device=mask.device).view(-1, 1).expand(mask.shape)
    out = torch.zeros((*mask.shape[:-2], count + 1, mask.shape[-1]), dtype=torch.long, device=mask.device)
    return out.scatter_(-2, slot, positions)[..., :count, :]


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

    def select(self, scores: torch.Tensor, k: int, tokens_per_sample: int, kth_of: torch.Tensor | None = None,
               finite: bool = False) -> Selection:
        grouped = self._groups(scores, tokens_per_sample)
        mask = _ranked_topk_mask(grouped, k)
        index = None
        if finite:  # every pool gives each expert exactly k' tokens: positions, pool by pool
            per_pool = max(0, min(k, grouped.shape[1]))
            pos = mask_positions(mask, per_pool) + (torch.arange(grouped.shape[0], device=scores.device)
                                                    * grouped.shape[1]).view(-1, 1, 1)
            index = pos.permute(2, 0, 1).reshape(scores.shape[1], -1)  # [E, pools * k'], ascending
        kth = None if kth_of is None else self._kth_largest(kth_of, k, tokens_per_sample)
        return Selection(mask.reshape(scores.shape), index, kth)

    def _kth_largest(self, values: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        grouped = self._groups(values, tokens_per_sample)
        k = max(1, min(k, grouped.shape[1]))
        return torch.topk(grouped, k, dim=1).values[:, k - 1].mean(0)
