"""Token pools that span ranks: scopes `ep_group` (the ranks of one EP group) and `world`.

A pool is the concatenation, in group-rank order, of its ranks' flattened micro-batches; token i of
group rank r has pool index r * T + i (every rank holds the same number T of tokens). For each
expert the selection is the exact top-k of the pool, ties to the lower pool index, -inf never
chosen: the mask equals `LocalPool('micro_batch')` run on the concatenated batch, and every rank
agrees on it. Only routing metadata travels; hidden states never do.

Two exact selections (`parallel.pool_selection`):

* `gather`: all-gather the [T, E] scores and rank them locally. Simple; each rank sends
  (n - 1) * T * E * 4 bytes, growing with the token count and the group size n.
* `radix` (default): a distributed radix select over the order-preserving 32-bit keys of the
  scores. Four rounds, each an all-reduce of a per-expert 256-bin histogram of the next 8 bits
  of the keys that still match the threshold's known prefix, find every expert's k-th largest key
  (the threshold) and how many of the tokens equal to it belong to the top k. Each rank keeps
  its tokens above the threshold; when a tie straddles the threshold, one all-gather of per-rank
  tie counts hands the remaining places to the lowest pool indices.

  Metadata per selection and rank: 4 rounds x E x 256 x 4 bytes all-reduced (ring: about twice that
  sent, constant in T and in n), plus (n - 1) x E x 4 bytes for the tie counts when some tie
  straddles a threshold (linear in n, the only part that grows with the world size), plus 4 bytes
  (token-count check). Nothing grows with the token count.

For world > 1 the `sample` / `micro_batch` pools choose locally but average `kth_largest` over all
ranks, so the capacity predictor's thresholds stay identical everywhere.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from models.moe.pool import LocalPool, TokenPool
from parallel.comm_bytes import CommCounter, all_gather_bytes, all_reduce_bytes

if TYPE_CHECKING:
    from parallel.groups import ExpertParallelGroups

DIGIT_BITS = 8  # radix digit: 32-bit keys in 32 / 8 = 4 histogram rounds of 256 bins
_BINS = 1 << DIGIT_BITS
_SIGN = 1 << 31


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Floats (fp32/bf16/fp16) -> int64 keys in [0, 2^32) with the same order (equal floats, equal keys)."""
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"token selection takes fp32/bf16/fp16 scores, got {values.dtype}")
    bits = (values.detach().float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    # Non-negative floats order like their bits; negative ones in reverse, below all non-negative ones.
    return torch.where(bits >= 0, bits + _SIGN, -1 - bits)


def keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= _SIGN, keys - _SIGN, -1 - keys)
    return bits.to(torch.int32).view(torch.float32)


class CrossRankPool(TokenPool):
    """One pool per process group `group` (the EP group, or the world); see the module docstring."""

    def __init__(self, scope: str, group: dist.ProcessGroup, selection: str):
        if selection not in ("radix", "gather"):
            raise ValueError(f"parallel.pool_selection: {selection!r} is not one of 'radix', 'gather'")
        self.scope, self.group, self.selection = scope, group, selection
        self.size = dist.get_world_size(group)
        self.position = dist.get_rank(group)
        self.world_size = dist.get_world_size()
        self.counter = CommCounter()

    def pool_tokens(self, num_tokens: int, tokens_per_sample: int) -> int:
        return num_tokens * self.size

    # --- selection -------------------------------------------------------------------------

    def topk_mask(self, scores: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        if self.selection == "gather":
            pooled = self._gather(scores)
            rows = slice(self.position * scores.shape[0], (self.position + 1) * scores.shape[0])
            return LocalPool("micro_batch").topk_mask(pooled, k, tokens_per_sample)[rows]
        keys = order_keys(scores).masked_fill(scores.detach() == float("-inf"), -1)  # -1: not a candidate
        threshold, wanted, ties_total = self._radix_select(keys, k)
        above = keys > threshold
        tie = keys == threshold
        # Ties at the threshold go to the lowest pool indices: earlier ranks first, then local order.
        take = wanted  # places left for ties; all ties fit unless some tie straddles the threshold
        if bool(((ties_total > wanted) & (wanted > 0)).any()):
            counts = self._all_gather(tie.sum(0, dtype=torch.int32))  # [n, E] per-rank tie counts
            before = counts[: self.position].sum(0)
            take = (wanted - before).clamp(min=0)
        tie_rank = tie.cumsum(0) - 1  # order of each tie among this rank's ties, by local index
        return (above | (tie & (tie_rank < take))) & (wanted > 0)

    def kth_largest(self, values: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        k = max(1, min(k, self.pool_tokens(values.shape[0], tokens_per_sample)))
        if self.selection == "gather":
            pooled = self._gather(values)
            kth = torch.topk(pooled, k, dim=0).values[k - 1]
        else:
            kth = keys_to_float(self._radix_select(order_keys(values), k)[0]).to(values.dtype)
        return self._average_over_pools(kth)

    def _radix_select(self, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per expert over the pool: (threshold key = k-th largest candidate key, how many keys equal to
        it are in the top k, how many keys equal it in the pool). k is clamped to the candidates."""
        num_tokens, num_experts = keys.shape
        candidate = keys >= 0
        bins = torch.arange(num_experts, device=keys.device) * _BINS
        prefix = torch.zeros(num_experts, dtype=torch.int64, device=keys.device)
        wanted = torch.zeros_like(prefix)
        for shift in range(32 - DIGIT_BITS, -1, -DIGIT_BITS):
            high = shift + DIGIT_BITS
            match = candidate & ((keys >> high) == (prefix >> high))
            digit = (keys >> shift) & (_BINS - 1)
            hist = torch.bincount((bins + digit)[match], minlength=num_experts * _BINS).to(torch.int32)
            if shift == 32 - DIGIT_BITS:  # first round: also check that every rank has the same T
                hist = self._all_reduce(torch.cat([hist, hist.new_tensor([num_tokens])]))
                self._check_token_count(int(hist[-1]), num_tokens)
                hist = hist[:-1].view(num_experts, _BINS).long()
                wanted = hist.sum(1).clamp(max=k)
            else:
                hist = self._all_reduce(hist).view(num_experts, _BINS).long()
            above = hist.flip(1).cumsum(1).flip(1) - hist  # candidates in higher bins
            hit = (above < wanted[:, None]) & (wanted[:, None] <= above + hist)  # bin holding the wanted-th key
            digit_of_kth = hit.int().argmax(1)
            wanted = torch.where(wanted > 0, wanted - above.gather(1, digit_of_kth[:, None]).squeeze(1), wanted)
            prefix = prefix | (digit_of_kth << shift)
            ties_total = hist.gather(1, digit_of_kth[:, None]).squeeze(1)
        return prefix, wanted, ties_total

    def _check_token_count(self, total: int, num_tokens: int) -> None:
        if total != num_tokens * self.size:
            raise ValueError(f"model.moe.pool={self.scope}: ranks hold different token counts (this rank {num_tokens}, "
                             f"pool {total} over {self.size} ranks); every rank needs the same micro-batch size")

    # --- collectives (counted) -----------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        self.counter.add("metadata_bytes", all_reduce_bytes(t, self.size))
        return t

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        self.counter.add("metadata_bytes", all_gather_bytes(t, self.size))
        return torch.stack(parts)

    def _gather(self, scores: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(scores) for _ in range(self.size)]
        local = scores.detach().contiguous()
        dist.all_gather(parts, local, group=self.group)
        self.counter.add("score_gather_bytes", all_gather_bytes(local, self.size))
        return torch.cat(parts)

    def _average_over_pools(self, kth: torch.Tensor) -> torch.Tensor:
        """Mean over the job's pools: every rank adds its pool's value, each pool has `size` ranks."""
        if self.world_size == self.size:
            return kth
        return _world_mean(kth, self.counter)


class RankAveragedPool(LocalPool):
    """`sample` / `micro_batch` at world > 1: local top-k, `kth_largest` averaged over all ranks."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.counter = CommCounter()

    def kth_largest(self, values: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        return _world_mean(super().kth_largest(values, k, tokens_per_sample), self.counter)


def _world_mean(t: torch.Tensor, counter: CommCounter) -> torch.Tensor:
    world = dist.get_world_size()
    total = t.detach().to(torch.float64, copy=True)  # float64: the mean of large thresholds must not overflow
    dist.all_reduce(total)
    counter.add("metadata_bytes", all_reduce_bytes(total, world))
    return (total / world).to(t.dtype)


def build_pool(scope: str, groups: ExpertParallelGroups, selection: str) -> TokenPool:
    """The pool of `model.moe.pool` under this process layout (a one-rank pool is `micro_batch`)."""
    if scope in ("sample", "micro_batch"):
        return RankAveragedPool(scope) if groups.world_size > 1 else LocalPool(scope)
    if scope not in ("ep_group", "world"):
        raise ValueError(f"model.moe.pool: unknown scope {scope!r}")
    pool_ranks = groups.ep_size if scope == "ep_group" else groups.world_size
    if pool_ranks == 1:
        return build_pool("micro_batch", groups, selection)
    return CrossRankPool(scope, groups.ep_group if scope == "ep_group" else dist.group.WORLD, selection)
