"""Token pools that span ranks: scopes `ep_group` (the ranks of one EP group) and `world`.

A pool is the concatenation, in group-rank order, of its ranks' flattened micro-batches; token i of
group rank r has pool index r * T + i (every rank holds the same number T of tokens). For each
expert the selection is the exact top-k of the pool, ties to the lower pool index, -inf never
chosen: the mask equals `LocalPool('micro_batch')` run on the concatenated batch, and every rank
agrees on it. Only routing metadata travels; hidden states never do.

Two exact selections (`parallel.pool_selection`):

* `gather`: all-gather the [T, E] scores and rank them locally. Simple; each rank sends
  (n - 1) * T * E * 4 bytes, growing with the token count and the group size n.
* `radix` (default): a distributed most-significant-digit radix select over order-preserving
  32-bit integer keys of the scores (the float bits, flipped so that integer order is float
  order), on a fixed schedule of ROUNDS = 4 collectives whatever the data:
    rounds 1-3: all-reduce (sum) per-column histograms of the next 8-bit digit of the keys that
                match the prefix found so far; each round fixes 8 more bits of each column's k-th
                largest key;
    round 4:    all-gather the last digit's per-rank histograms (int16 when a rank holds < 2^15
                tokens): their sum gives the exact k-th key v, and the per-rank counts of v give
                each rank its share of a tie at v (lower pool positions first) in the same pass.
  Each rank then keeps its keys above v and its share of the keys equal to v. Columns are the E
  experts' scores plus, when asked (`kth_of`), the capacity predictor's E probability columns:
  the threshold target comes out of the same collectives, not from a second selection. No
  device->host sync and no data-dependent branch: every rank issues the same collectives in the
  same order. Metadata per selection and rank: 3 all-reduces of C x 256 x 4 bytes and one
  all-gather of C x 256 x 2 (or 4) bytes (C = E, or 2E with the predictor), independent of the
  token count T.
  The check that every rank holds the same number of tokens rides in round 1 and is verified by
  the dispatcher at the host sync it makes anyway (`Selection.checks`).

For world > 1 the `sample` / `micro_batch` pools choose locally but average the predictor's k-th
largest values over all ranks (one all-reduce), so the capacity predictor's thresholds stay
identical everywhere; so do cross-rank pools smaller than the world.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from models.moe.pool import LocalPool, Selection, TokenPool
from parallel.comm_bytes import CommCounter, all_gather_bytes, all_reduce_bytes

if TYPE_CHECKING:
    from parallel.groups import ExpertParallelGroups

DIGIT_BITS = 8
BINS = 1 << DIGIT_BITS  # histogram bins per round
ROUNDS = 32 // DIGIT_BITS  # collectives per selection: a 32-bit key is pinned down after ROUNDS digits
_SIGN = 1 << 31
_ABOVE_ALL_KEYS = 1 << 32  # keys are in [0, 2^32)


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

    def select(self, scores: torch.Tensor, k: int, tokens_per_sample: int, kth_of: torch.Tensor | None = None,
               finite: bool = False) -> Selection:
        num_tokens, num_experts = scores.shape
        if self.selection == "gather":
            return self._select_gathered(scores, k, tokens_per_sample, kth_of)
        keys = order_keys(scores).masked_fill(scores.detach() == float("-inf"), -1)  # -1: not a candidate
        if kth_of is not None:
            keys = torch.cat([keys, order_keys(kth_of)], 1)
        kth_key, take, total = self._radix_select(keys, k)
        mine = keys[:, :num_experts]
        tied = mine == kth_key[:num_experts]
        mask = (mine > kth_key[:num_experts]) | (tied & (tied.cumsum(0) <= take[:num_experts]))
        kth = None
        if kth_of is not None:
            kth = self._average_over_pools(keys_to_float(kth_key[num_experts:]).to(kth_of.dtype))
        message = (f"model.moe.pool={self.scope}: ranks hold different token counts (this rank {num_tokens}, "
                   f"pool {{got}} over {self.size} ranks); every rank needs the same micro-batch size")
        return Selection(mask, None, kth, checks=((total, num_tokens * self.size, message),))

    def _select_gathered(self, scores: torch.Tensor, k: int, tokens_per_sample: int,
                         kth_of: torch.Tensor | None) -> Selection:
        """`pool_selection: gather`: every rank ranks the whole pool's gathered scores."""
        columns = scores if kth_of is None else torch.cat([scores, kth_of.to(scores.dtype)], 1)
        pooled = self._gather(columns)
        num_tokens, num_experts = scores.shape
        rows = slice(self.position * num_tokens, (self.position + 1) * num_tokens)
        local = LocalPool("micro_batch").select(pooled[:, :num_experts], k, tokens_per_sample,
                                                None if kth_of is None else pooled[:, num_experts:])
        kth = None if local.kth is None else self._average_over_pools(local.kth.to(kth_of.dtype))
        return Selection(local.mask[rows], None, kth)

    def _radix_select(self, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """keys [T, C] (>= 0 candidates, -1 not) -> per column [C]: the pool's k-th largest candidate
        key (k clamped to the candidates; above every key when none is wanted), how many of this
        rank's candidates equal to it belong to the top k, and (a device scalar) the pool's token
        count. Collective: ROUNDS collectives, the same on every rank."""
        num_tokens, columns = keys.shape
        device = keys.device
        base = torch.arange(columns, device=device) * BINS
        prefix = torch.zeros(columns, dtype=torch.int64, device=device)  # the k-th key's digits found so far
        above = torch.zeros_like(prefix)  # candidates of the pool above the prefix's key range
        for r in range(ROUNDS):
            shift = 32 - DIGIT_BITS * (r + 1)
            match = (keys >= 0) & ((keys >> (shift + DIGIT_BITS)) == prefix)
            digit = (keys >> shift) & (BINS - 1)
            hist = torch.zeros(columns * BINS, dtype=torch.int32, device=device).index_add_(
                0, (base + digit).reshape(-1), match.reshape(-1).to(torch.int32))
            if r == ROUNDS - 1:  # per-rank counts of the last digit: the tie split needs the lower ranks' share
                small = torch.int16 if num_tokens < (1 << 15) else torch.int32
                per_rank = self._all_gather(hist.to(small)).to(torch.int64).view(self.size, columns, BINS)
                hist = per_rank.sum(0)
            elif r == 0:  # the token count rides along: checked later, at the dispatcher's host sync
                hist = torch.cat([hist, torch.full((1,), num_tokens, dtype=torch.int32, device=device)])
                hist = self._all_reduce(hist)
                total, hist = hist[-1], hist[:-1]
            else:
                hist = self._all_reduce(hist)
            hist = hist.view(columns, BINS).to(torch.int64)
            if r == 0:  # k, clamped to the candidates of the pool (round 1 sees them all)
                wanted = torch.clamp(hist.sum(1), max=k)
            # candidates above each bin, counting from the top digit down; the bin holding the k-th
            higher = above[:, None] + hist.flip(1).cumsum(1).flip(1) - hist
            hit = (higher < wanted[:, None]) & (wanted[:, None] <= higher + hist)
            b = hit.to(torch.int64).argmax(1)  # no hit (nothing wanted): bin 0, and `need` below is 0
            above = higher.gather(1, b[:, None]).squeeze(1)
            prefix = (prefix << DIGIT_BITS) | b
        need = (wanted - above).clamp(min=0)  # ties at the k-th key that belong to the top k
        lower_ranks = per_rank[: self.position].sum(0).gather(1, b[:, None]).squeeze(1)
        take = (need - lower_ranks).clamp(min=0)
        kth_key = torch.where(wanted > 0, prefix, torch.full_like(prefix, _ABOVE_ALL_KEYS))  # nothing wanted
        return kth_key, take, total

    def pool_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks of this pool (all-reduce on the pool group); not differentiable."""
        return self._all_reduce(values.detach().clone())

    # --- collectives (counted) -----------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
        self.counter.add("metadata_bytes", all_reduce_bytes(t, self.size))
        return t

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*] -> [size, *]. Travels as bytes: NCCL has no int16, and an all-gather only copies."""
        raw = t.contiguous().view(torch.uint8)
        out = raw.new_empty(self.size * raw.numel())  # ranks' chunks stacked along dim 0
        _all_gather_single()(out, raw, group=self.group)
        self.counter.add("metadata_bytes", all_gather_bytes(raw, self.size))
        return out.view(self.size, *raw.shape).view(t.dtype)

    def _gather(self, scores: torch.Tensor) -> torch.Tensor:
        local = scores.detach().contiguous()
        out = local.new_empty((self.size * local.shape[0], *local.shape[1:]))  # ranks' rows stacked along dim 0
        _all_gather_single()(out, local, group=self.group)
        self.counter.add("score_gather_bytes", all_gather_bytes(local, self.size))
        return out

    def _average_over_pools(self, kth: torch.Tensor) -> torch.Tensor:
        """Mean over the job's pools: every rank adds its pool's value, each pool has `size` ranks."""
        if self.world_size == self.size:
            return kth
        return _world_mean(kth, self.counter)


class RankAveragedPool(LocalPool):
    """`sample` / `micro_batch` at world > 1: local top-k, the k-th largest values averaged over all ranks."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.counter = CommCounter()

    def select(self, scores: torch.Tensor, k: int, tokens_per_sample: int, kth_of: torch.Tensor | None = None,
               finite: bool = False) -> Selection:
        local = super().select(scores, k, tokens_per_sample, kth_of, finite)
        if local.kth is not None:
            local.kth = _world_mean(local.kth, self.counter)
        return local

def _all_gather_single():
    """torch >= 2.10 renamed `all_gather_into_tensor` (kept for the older CUDA builds of clusters)."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
