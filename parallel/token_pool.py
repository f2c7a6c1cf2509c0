"""Token pools that span ranks: scopes `ep_group` (the ranks of one EP group) and `world`.

A pool is the concatenation, in group-rank order, of its ranks' flattened micro-batches; token i of
group rank r has pool index r * T + i (every rank holds the same number T of tokens). For each
expert the selection is the exact top-k of the pool, ties to the lower pool index, -inf never
chosen: the mask equals `LocalPool('micro_batch')` run on the concatenated batch, and every rank
agrees on it. Only routing metadata travels; hidden states never do.

Two exact selections (`parallel.pool_selection`):

* `gather`: all-gather the [T, E] scores and rank them locally. Simple; each rank sends
  (n - 1) * T * E * 4 bytes, growing with the token count and the group size n.
* `radix` (default): a distributed bucket (radix-style) select over order-preserving integer keys
  of the scores (the float bits, flipped so that integer order is float order):
    1. bracket: one all-reduce (max) of each rank's ceil(k/n)-th largest key per expert gives a
       key range [lo, hi] certain to hold the pool's k-th largest key (usually a few dozen keys);
    2. refine: all-reduce per-expert histograms of the keys in the range over BINS equal sub-ranges
       (+ the count above it) and keep the sub-range holding the k-th; stop once every key of the
       range is in the top k or the range is one key wide (at most MAX_ROUNDS rounds, usually 1-2);
    3. each rank keeps its tokens above the range and those in it; if a single key value straddles
       the threshold (ties), one all-gather of per-rank counts of that value gives the remaining
       places to the lowest pool indices.
  Metadata per selection and rank (sent, ring all-reduce ~2x the tensor): bracket E x 16 bytes,
  each round E x (BINS + 1) x 4 bytes, + 4 bytes (token-count check); tie counts (n - 1) x E x 4
  bytes when a tie straddles a threshold. Bounded by a constant independent of the token count
  T and, except the tie counts, of the group size n; only the number of rounds can grow, at
  most logarithmically in T x n (the bracket holds ~ n sqrt(T) keys) and never beyond MAX_ROUNDS.
  `kth_largest` adds one all-reduce (min) when the k-th key is not pinned down exactly.

For world > 1 the `sample` / `micro_batch` pools choose locally but average `kth_largest` over all
ranks, so the capacity predictor's thresholds stay identical everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from models.moe.pool import LocalPool, TokenPool
from parallel.comm_bytes import CommCounter, all_gather_bytes, all_reduce_bytes

if TYPE_CHECKING:
    from parallel.groups import ExpertParallelGroups

BINS = 64  # key ranges per refinement round
MAX_ROUNDS = 6  # 64^6 > 2^33: any key range is one key wide after six rounds
_SIGN = 1 << 31
_NO_KEY = 1 << 40  # above every key


@dataclass
class _Found:
    """Per expert [E]: the key range [lo, hi] holding the k-th largest candidate of the pool, how many
    of its candidates belong to the top k (`need`, 0 when no candidate is wanted), and how many
    candidates it holds over the pool (`inside`)."""

    lo: torch.Tensor
    hi: torch.Tensor
    need: torch.Tensor
    inside: torch.Tensor


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
        if k <= 0:  # every rank has the same k: nobody enters a collective
            return torch.zeros_like(scores, dtype=torch.bool)
        keys = order_keys(scores).masked_fill(scores.detach() == float("-inf"), -1)  # -1: not a candidate
        found = self._select(keys, k)
        above = keys > found.hi
        inside = (keys >= found.lo) & (keys <= found.hi) & (keys >= 0)
        take = found.need  # every candidate inside is taken, unless a tie straddles the threshold
        if bool(((found.inside > found.need) & (found.need > 0)).any()):
            # Only a one-key interval is left: its copies go to the lowest pool indices, earlier ranks first.
            counts = self._all_gather(inside.sum(0, dtype=torch.int32))  # [n, E] per-rank tie counts
            take = (found.need - counts[: self.position].sum(0)).clamp(min=0)
        order_inside = inside.cumsum(0) - 1  # local index order among this rank's candidates inside
        return (above | (inside & (order_inside < take))) & (found.need > 0)

    def kth_largest(self, values: torch.Tensor, k: int, tokens_per_sample: int) -> torch.Tensor:
        k = max(1, min(k, self.pool_tokens(values.shape[0], tokens_per_sample)))
        if self.selection == "gather":
            pooled = self._gather(values)
            kth = torch.topk(pooled, k, dim=0).values[k - 1]
        else:
            keys = order_keys(values)
            found = self._select(keys, k)
            kth_key = found.lo
            if bool((found.lo < found.hi).any()):  # the interval's keys are all in the top k: take its smallest
                inside = (keys >= found.lo) & (keys <= found.hi)
                smallest = torch.where(inside, keys, torch.full_like(keys, _NO_KEY)).amin(0)
                kth_key = torch.where(found.lo < found.hi, -self._all_reduce(-smallest, dist.ReduceOp.MAX), found.lo)
            kth = keys_to_float(kth_key).to(values.dtype)
        return self._average_over_pools(kth)

    def _select(self, keys: torch.Tensor, k: int) -> _Found:
        """Locate each expert's k-th largest candidate key (keys >= 0) of the pool; k is clamped to
        the number of candidates. Collective: every rank of the group calls it with the same k."""
        num_tokens, num_experts = keys.shape
        candidate = keys >= 0
        count = candidate.sum(0)
        # Bracket. With q = ceil(k / n), at most n (q - 1) < k candidates exceed every rank's q-th
        # largest key and at least n q >= k reach the smallest of them. A rank with fewer than q
        # candidates bounds from above with its smallest one and leaves the lower end open (-1).
        q = -(-k // self.size)
        qth = keys.topk(min(q, num_tokens), dim=0).values[-1]
        smallest = torch.where(candidate, keys, torch.full_like(keys, _NO_KEY)).amin(0)
        full = count >= q
        hi = torch.where(full, qth, torch.where(count > 0, smallest, -1))
        lo = torch.where(full, qth, -1)
        bounds = self._all_reduce(torch.cat([hi, -lo]), dist.ReduceOp.MAX)
        hi, lo = bounds[:num_experts], -bounds[num_experts:]

        # Refine: histogram the candidates of [lo, hi] into BINS equal key ranges (+ one bin for those
        # above hi), all-reduce, keep the range holding the wanted key. Stop once every candidate of
        # the range is wanted or the range is one key wide.
        slot_base = torch.arange(num_experts, device=keys.device) * (BINS + 1)
        active = torch.ones(num_experts, dtype=torch.bool, device=keys.device)
        need = torch.zeros_like(hi)
        inside = torch.zeros_like(hi)
        wanted = None
        for step in range(MAX_ROUNDS):
            width = (hi - lo) // BINS + 1
            in_range = candidate & (keys >= lo) & (keys <= hi) & active
            over = candidate & (keys > hi) & active
            slot = slot_base + torch.where(over, BINS, ((keys - lo) // width).clamp(0, BINS - 1))
            hist = torch.bincount(slot[in_range | over], minlength=num_experts * (BINS + 1)).to(torch.int32)
            if step == 0:  # also check that every rank has the same number of tokens
                hist = self._all_reduce(torch.cat([hist, hist.new_tensor([num_tokens])]))
                self._check_token_count(int(hist[-1]), num_tokens)
                hist = hist[:-1]
            else:
                hist = self._all_reduce(hist)
            hist = hist.view(num_experts, BINS + 1).long()
            above, hist = hist[:, BINS], hist[:, :BINS]
            if wanted is None:  # the range [lo, hi] holds every candidate, or at least k of them
                wanted = torch.minimum(above + hist.sum(1), torch.full_like(above, k))
            higher = above[:, None] + hist.flip(1).cumsum(1).flip(1) - hist  # candidates above each bin
            hit = (higher < wanted[:, None]) & (wanted[:, None] <= higher + hist)
            b = hit.int().argmax(1, keepdim=True)
            new_lo = lo + b.squeeze(1) * width
            update = active & (wanted > 0)
            lo, hi = torch.where(update, new_lo, lo), torch.where(update, torch.minimum(new_lo + width - 1, hi), hi)
            need = torch.where(update, wanted - higher.gather(1, b).squeeze(1), need)
            inside = torch.where(update, hist.gather(1, b).squeeze(1), inside)
            active = update & (need != inside) & (lo != hi)
            if not bool(active.any()):
                break
        return _Found(lo, hi, need, inside)

    def pool_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks of this pool (all-reduce on the pool group); not differentiable."""
        return self._all_reduce(values.detach().clone())

    def _check_token_count(self, total: int, num_tokens: int) -> None:
        if total != num_tokens * self.size:
            raise ValueError(f"model.moe.pool={self.scope}: ranks hold different token counts (this rank {num_tokens}, "
                             f"pool {total} over {self.size} ranks); every rank needs the same micro-batch size")

    # --- collectives (counted) -----------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
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
